# Study set-up and data-side shared stages: the MLflow store and parent run, each unit's resolved
# config and MLflow child run, the demo's classifier (FID feature proxy / REPA target), the
# FID reference statistics and the real-vs-real floor. Every GPU stage is a local rule that calls the simflow CLI, which
# runs in-process or submits one submitit job (SLURM) and waits for it (launcher backend).


# First rule of the DAG: creates the MLflow database (once, under a lock, before any parallel
# writer), the study's experiment (tagged as model training, so the UI opens on its runs) and its
# parent run, left RUNNING: the Snakefile's onsuccess/onerror handlers end it with the study.
rule mlflow_init:
    output:
        parent=STUDY.parent_run_id_file,
    params:
        args=shlex.join(
            ["--study", STUDY.name, "--results-root", STUDY.results_root, "--experiment", STUDY.experiment,
             "--running"]
            + tracking_args()
            + ([] if STUDY.tracking["enabled"] else ["--disabled"])
        ),
    log:
        f"{LOGS}/mlflow_init.log",
    localrule: True
    conda:
        ENV
    shell:
        "python3 -m simflow.study init-study {params.args} --out {output.parent} > {log} 2>&1"


# A unit (one variant and seed, or a shared stage) gets its resolved stage config and its MLflow
# child run, through the same study CLI as mlflow_init. The unit's explicit config is a params
# value: when it changes this rule re-runs, and everything of this unit downstream of
# config.yaml re-runs with it; other units do not. The parent run id is ancient(): re-creating
# the parent run does not re-run the study. The run name comes from the unit
# (simflow.study.unit_run_name, in the CLI), not a params value: renaming runs re-runs nothing.
rule setup_unit:
    input:
        parent=ancient(STUDY.parent_run_id_file),
    output:
        config=f"{SD}/{{unit}}/{CONFIG_FILE}",
        run_id=f"{SD}/{{unit}}/{RUN_ID_FILE}",
    params:
        config=setup_params,
        tags=run_tags,
        args=setup_args,
    log:
        f"{LOGS}/{{unit}}/setup.log",
    localrule: True
    conda:
        ENV
    shell:
        "python3 -m simflow.study setup-unit {params.args} --out-config {output.config:q}"
        " --out-run-id {output.run_id:q} --parent {input.parent:q} > {log:q} 2>&1"


use rule stage as feature_extractor with:
    input:
        **unit_files(SHARED_UNITS["feature-extractor"]),
    output:
        **stage_outputs("feature-extractor", CLASSIFIER_DIR),
    params:
        **stage_params("feature-extractor"),
    log:
        f"{LOGS}/{SHARED_UNITS['feature-extractor']}.log",
    threads: threads_of("feature-extractor")


use rule stage as fid_ref with:
    input:
        **unit_files(SHARED_UNITS["fid-ref"]),
        **_classifier_input(STUDY.units.get(SHARED_UNITS["fid-ref"], {}), "eval.classifier_path"),
    output:
        **stage_outputs("fid-ref", FIDREF_DIR),
    params:
        **stage_params("fid-ref"),
    log:
        f"{LOGS}/{SHARED_UNITS['fid-ref']}.log",
    threads: threads_of("fid-ref")


# The real-vs-real floor, once per study: as many real test images as a variant generates,
# scored like samples against the reference (FID's small-sample bias; KID's, near 0).
use rule stage as fid_floor with:
    input:
        unpack(fid_floor_inputs),
    output:
        **stage_outputs("fid-floor", FIDFLOOR_DIR),
    params:
        **stage_params("fid-floor"),
    log:
        f"{LOGS}/{SHARED_UNITS['fid-floor']}.log",
    threads: threads_of("fid-floor")
