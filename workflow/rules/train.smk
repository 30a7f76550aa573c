# Training: the shared pretrained VAE of the frozen variants, then every (variant, seed).
# Resumable checkpoints live in <unit>/checkpoints/ and are deliberately not outputs
# (Snakemake deletes the outputs of a failed job; a re-run resumes from the latest checkpoint).


rule pretrain_vae:
    input:
        config=f"{PRETRAIN_DIR}/{CONFIG_FILE}",
        run_id=f"{PRETRAIN_DIR}/{RUN_ID_FILE}",
    output:
        **stage_outputs("pretrain-vae", PRETRAIN_DIR),
    params:
        cmd=stage_cmd("pretrain-vae"),
        launcher=launcher_args("pretrain-vae"),
    log:
        f"{LOGS}/{SHARED_UNITS['pretrain-vae']}/s{{seed}}.log",
    threads: threads_of("pretrain-vae")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"


rule train:
    input:
        unpack(train_inputs),
    output:
        **stage_outputs("train", VDIR),
    params:
        cmd=stage_cmd("train"),
        launcher=launcher_args("train"),
    log:
        f"{VLOG}/train.log",
    threads: threads_of("train")
    localrule: True
    conda:
        ENV
    shell:
        "{params.cmd} --config {input.config} {params.launcher} > {log} 2>&1"
