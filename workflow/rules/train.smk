# Training: the shared pretrained VAE of the frozen variants, then every (variant, seed).
# Resumable checkpoints live in <unit>/checkpoints/ and are deliberately not outputs
# (Snakemake deletes the outputs of a failed job; a re-run resumes from the latest checkpoint).


use rule stage as pretrain_vae with:
    input:
        config=f"{PRETRAIN_DIR}/{CONFIG_FILE}",
        run_id=f"{PRETRAIN_DIR}/{RUN_ID_FILE}",
    output:
        **stage_outputs("pretrain-vae", PRETRAIN_DIR),
    params:
        **stage_params("pretrain-vae"),
    log:
        f"{LOGS}/{SHARED_UNITS['pretrain-vae']}/s{{seed}}.log",
    threads: threads_of("pretrain-vae")


use rule stage as train with:
    input:
        unpack(train_inputs),
    output:
        **stage_outputs("train", VDIR),
    params:
        **stage_params("train"),
    log:
        f"{VLOG}/train.log",
    threads: threads_of("train")
