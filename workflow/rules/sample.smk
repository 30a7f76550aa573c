# Sampling: sample.num_samples images per (variant, seed) from the trained model (EMA weights),
# saved as the ADM-style npz (arr_0 uint8 NHWC) plus a preview grid.


use rule stage as sample with:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("sample", VDIR),
    params:
        **stage_params("sample"),
    log:
        f"{VLOG}/sample.log",
    threads: threads_of("sample")
