# Evaluation of every (variant, seed): generation FID against the shared reference statistics,
# reconstruction (rFID, PSNR under latent noise, interpolations), NLL in bits/dim with the flow's
# Bayes-classifier accuracy, the validation latents that the analysis turns into smoothness
# statistics, and, for units with eval.guidance_weights, samples and gFID against the CFG weight.


rule fid:
    input:
        unpack(fid_inputs),
    output:
        **stage_outputs("fid", VDIR),
    params:
        cmd=stage_cmd("fid"),
        launcher=launcher_args("fid"),
    log:
        f"{VLOG}/fid.log",
    threads: threads_of("fid")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"


rule guidance:
    input:
        unpack(eval_inputs),
    output:
        **stage_outputs("guidance", VDIR),
    params:
        cmd=stage_cmd("guidance"),
        launcher=launcher_args("guidance"),
    log:
        f"{VLOG}/guidance.log",
    threads: threads_of("guidance")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"


rule reconstruct:
    input:
        unpack(eval_inputs),
    output:
        **stage_outputs("reconstruct", VDIR),
    params:
        cmd=stage_cmd("reconstruct"),
        launcher=launcher_args("reconstruct"),
    log:
        f"{VLOG}/reconstruct.log",
    threads: threads_of("reconstruct")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"


rule nll:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("nll", VDIR),
    params:
        cmd=stage_cmd("nll"),
        launcher=launcher_args("nll"),
    log:
        f"{VLOG}/nll.log",
    threads: threads_of("nll")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"


rule latents:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("latents", VDIR),
    params:
        cmd=stage_cmd("latents"),
        launcher=launcher_args("latents"),
    log:
        f"{VLOG}/latents.log",
    threads: threads_of("latents")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"
