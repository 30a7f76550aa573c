# Sampling: sample.num_samples images per (variant, seed) from the trained model (EMA weights),
# saved as the ADM-style npz (arr_0 uint8 NHWC) plus a preview grid.


rule sample:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("sample", VDIR),
    params:
        cmd=stage_cmd("sample"),
        launcher=launcher_args("sample"),
    log:
        f"{VLOG}/sample.log",
    threads: threads_of("sample")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"
