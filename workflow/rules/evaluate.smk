# Evaluation of every (variant, seed): generation FID against the shared reference statistics,
# reconstruction (rFID, PSNR under latent noise, interpolations), NLL in bits/dim, and the
# validation latents that the analysis turns into smoothness statistics.


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
