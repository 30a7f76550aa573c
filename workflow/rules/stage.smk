# The template of every stage rule: `use rule stage as <name> with:` gives each its inputs (a
# `config` among them), outputs, params (stage_params: the stage's command and launcher
# arguments), log and threads. The command runs in this process (a local rule): it runs the stage
# here or submits its job and waits for it (simflow.runner), its output in the rule's log. The
# template's own output is a file that no rule or target asks for.


rule stage:
    input:
        config=f"{SD}/{{unit}}/{CONFIG_FILE}",
    output:
        f"{SD}/{{unit}}/.stage-template",
    params:
        **stage_params("train"),
    log:
        f"{LOGS}/{{unit}}/stage-template.log",
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"
