# Evaluation of every (variant, seed): generation FID against the shared reference statistics,
# reconstruction (rFID, PSNR under latent noise, interpolations), NLL in bits/dim with the flow's
# Bayes-classifier accuracy, the validation latents that the analysis turns into smoothness
# statistics, and, for units with eval.guidance_weights, samples and gFID against the CFG weight.


use rule stage as fid with:
    input:
        unpack(fid_inputs),
    output:
        **stage_outputs("fid", VDIR),
    params:
        **stage_params("fid"),
    log:
        f"{VLOG}/fid.log",
    threads: threads_of("fid")


use rule stage as guidance with:
    input:
        unpack(eval_inputs),
    output:
        **stage_outputs("guidance", VDIR),
    params:
        **stage_params("guidance"),
    log:
        f"{VLOG}/guidance.log",
    threads: threads_of("guidance")


use rule stage as reconstruct with:
    input:
        unpack(eval_inputs),
    output:
        **stage_outputs("reconstruct", VDIR),
    params:
        **stage_params("reconstruct"),
    log:
        f"{VLOG}/reconstruct.log",
    threads: threads_of("reconstruct")


use rule stage as nll with:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("nll", VDIR),
    params:
        **stage_params("nll"),
    log:
        f"{VLOG}/nll.log",
    threads: threads_of("nll")


use rule stage as latents with:
    input:
        unpack(model_inputs),
    output:
        **stage_outputs("latents", VDIR),
    params:
        **stage_params("latents"),
    log:
        f"{VLOG}/latents.log",
    threads: threads_of("latents")
