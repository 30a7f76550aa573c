# The preflight: `snakemake preflight` rehearses every training run of the study before it is
# submitted for real. One short rehearsal per training unit (each variant's first seed, and the
# shared pretrained VAE), through the real stage code and launcher on one GPU (simflow.preflight),
# then one report: results/<study>/preflight/report.md and report.json, also attached to the
# study's MLflow parent run. Nothing here depends on the real training outputs, and `all` does not
# depend on the preflight. A rehearsal that finds a problem still succeeds: the problem is its
# (red) row. After fixing something outside the config (a file on the nodes), re-run the
# rehearsals with `--forcerun preflight_unit`.

PREFLIGHT_UNITS = list(sf.preflight_units(STUDY))
PREFLIGHT_ROWS = [stage_file("preflight", "row", f"{SD}/{unit}") for unit in PREFLIGHT_UNITS]


rule preflight_unit:
    input:
        config=f"{SD}/{{unit}}/{CONFIG_FILE}",
        run_id=f"{SD}/{{unit}}/{RUN_ID_FILE}",
    output:
        **stage_outputs("preflight", f"{SD}/{{unit}}"),
    params:
        cmd=stage_cmd("preflight"),
        launcher=preflight_launcher_args,
        rehearsal=preflight_args,
    log:
        f"{LOGS}/{{unit}}/preflight.log",
    threads: threads_of("preflight")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} {params.rehearsal} > {log} 2>&1"


rule preflight_report:
    input:
        rows=PREFLIGHT_ROWS,
        parent=ancient(STUDY.parent_run_id_file),
    output:
        markdown=f"{SD}/preflight/report.md",
        json=f"{SD}/preflight/report.json",
    params:
        plan=sf.preflight_plan(STUDY),
        study=STUDY.name,
        steps=STUDY.preflight["steps"],
        cpu_overrides=STUDY.preflight["cpu_overrides"],
        tracking_uri=sf.Untracked(STUDY.tracking["tracking_uri"] or ""),
    log:
        f"{LOGS}/preflight/report.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/preflight_report.py"


rule preflight:
    input:
        rules.preflight_report.output,
