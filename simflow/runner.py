"""Run one stage: load its config, then run it in this process or submit it through the launcher.

``simflow <stage>`` calls :func:`run_stage`. With ``launcher.backend: local`` the stage runs here
(:func:`run_here`: the process group, the stage's MLflow run, the stage function). With a
submitit backend the resolved config is saved as ``<run_dir>/jobs/<stage>.yaml`` and one
checkpointable :class:`simflow.launch.Call` of this same function, on that snapshot with
``launcher.backend=local``, is submitted and waited for: the job (and any requeue of it) runs
what was resolved at submission, whatever happens to the YAML while it waits in the queue.

The submit path imports neither torch nor MLflow (only the config, the launcher and submitit):
the stage's modules are imported inside the job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from simflow.config import Config, ConfigError, load_config, save_config
from simflow import launch
from simflow.contracts import STAGES, TRAINING_STAGES
from simflow.distributed import check_launch_backend, init_distributed, shutdown
from simflow.io import write_json
from simflow.preflight import ROW_FILE, failed_row, summary_line
from simflow.tracking import (StageRun, TrackingStoreError, check_tracking_store, init_stage_run,
                              resolve_tracking_uri)

__all__ = ["run_here", "run_preflight", "run_stage", "variant_run_id_file"]


def run_stage(stage: str, config_path: str | None, overrides: list[str] | None = None) -> Any:
    """Load the config (``config_path`` and ``key=value`` ``overrides``), then run ``stage``
    here or through the configured launcher; returns the stage's result (task 0's for a job)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    if cfg.tracking.enabled:  # before any work, and before a job waits in a queue for it
        check_tracking_store(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.results_root))
    if cfg.launcher.backend == "local":
        return run_here(stage, cfg)
    check_launch_backend(cfg.launcher.backend)  # not from each rank of torchrun / srun
    snapshot = save_config(cfg, Path(cfg.run_dir) / "jobs" / f"{stage}.yaml")
    job = launch.Call("simflow.runner:run_stage", stage, str(snapshot), ["launcher.backend=local"])
    return launch.launch(job, cfg.launcher, job_name=f"{cfg.study}.{cfg.variant}.{stage}")


def run_here(stage: str, cfg: Config) -> dict:
    """Run ``stage`` in this process: join the process group (one rank of a multi-task job, or a
    single process), attach global rank 0 to the unit's MLflow run (the training stages also log
    MLflow's system metrics), call the stage function, leave the process group."""
    # lazy: torch and the stages cost ~2.5 CPU-s; the submit path must not load them (tests/test_layout.py)
    import torch
    from simflow.stages import STAGE_FUNCTIONS

    if os.environ.get("SUBMITIT_EXECUTOR"):  # a submitted job: use the CPUs it was given
        torch.set_num_threads(max(1, cfg.launcher.cpus_per_task))
    env = init_distributed()
    try:
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.results_root)
        enabled = cfg.tracking.enabled and env.is_main
        run_id_file = variant_run_id_file(cfg, uri) if enabled else Path(os.devnull)
        with StageRun(uri, run_id_file, stage.replace("-", "_"), enabled=enabled,
                      system_metrics=stage in TRAINING_STAGES) as run:
            return STAGE_FUNCTIONS[stage](cfg, env, run)
    finally:
        shutdown()


def variant_run_id_file(cfg: Config, tracking_uri: str | None = None) -> Path:
    """The MLflow run-id file of this unit: ``tracking.run_id_file`` (written by the workflow),
    or, for a stage run by hand outside the workflow, one made in its run_dir
    (:func:`simflow.tracking.init_stage_run`)."""
    if cfg.tracking.run_id_file:
        return Path(cfg.tracking.run_id_file)
    uri = tracking_uri or resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.results_root)
    return init_stage_run(uri, cfg.tracking.experiment, cfg.study, cfg.variant,
                          Path(cfg.results_root) / cfg.study, cfg.run_dir)


def run_preflight(config_path: str | None, overrides: list[str] | None = None) -> int:
    """``simflow preflight``: run the stage through its launcher; a job that fails without a row
    (killed for host memory, out of time, a node failure) gets a red row naming its logs."""
    try:
        run_stage("preflight", config_path, overrides)
        return 0
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the report must still get this row
        cfg = load_config(config_path, overrides)
        text = str(err)
        key = "stage_launcher.preflight / launcher_preflight_<key>"
        if isinstance(err, TrackingStoreError):  # checked before the job: the store, not the job
            row = failed_row(cfg, "tracking", text, "tracking.tracking_uri / tracking.enabled")
            write_json(Path(cfg.run_dir) / ROW_FILE, row)
            print(summary_line(row), flush=True)
            return 0
        if "OUT_OF_MEMORY" in text or "oom" in text.lower():
            key = "launcher_preflight_mem_gb (host memory of the job)"
        elif "TIMEOUT" in text:
            key = "preflight.steps or launcher_preflight_timeout_min"
        row = failed_row(cfg, "job", f"the rehearsal produced no result: {type(err).__name__}: {text[-2000:]}", key)
        write_json(Path(cfg.run_dir) / ROW_FILE, row)
        print(summary_line(row), flush=True)
        return 0
