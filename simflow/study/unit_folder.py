"""A unit's folder and its MLflow run: the files the workflow writes before a unit's stages run.

``<unit>/config.yaml`` (the resolved stage config, launcher left out), ``<unit>/mlflow_run_id.txt``
(its MLflow child run, under the study's parent run in ``<study>/mlflow_parent_run_id.txt``), and
``<unit>/.setup.json`` (the fingerprint of the config the folder was last set up with).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from simflow.config import to_dict
from simflow.contracts import PARENT_RUN_RECORD
from simflow.io import write_json, write_text
from simflow.study.units import resolved_config

__all__ = ["check_study_store", "config_fingerprint", "init_study_tracking", "set_study_run_status",
           "setup_unit", "write_stage_config"]

#: The file in a unit folder that remembers the fingerprint of its last config and run.
SETUP_STATE = ".setup.json"


def config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the full resolved config (key order and default-filling do not matter)."""
    full = to_dict(resolved_config(cfg))
    full.pop("preflight", None)  # set per rehearsal by the workflow, never part of a unit
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


def write_stage_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the full resolved stage config of ``cfg`` (defaults filled in, launcher left out)
    atomically to ``path``; returns the path."""
    full = to_dict(resolved_config(cfg))
    full.pop("launcher", None)
    full.pop("preflight", None)
    header = (f"# Resolved stage config of {full['study']}/{full['variant']} (written by the "
              "workflow; edit config/*.yaml instead).\n# The launcher is passed per stage with "
              "`--set launcher.<key>=...`; without it a stage runs in-process.\n")
    return write_text(path, header + yaml.safe_dump(full, sort_keys=False))


def _tracking_uri(tracking_uri: str | None, results_root: str) -> str:
    # lazy: tracking (~40 ms of stdlib) stays out of the Snakefile's parse of the study
    from simflow.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri, results_root)


def check_study_store(tracking: Mapping[str, Any], results_root: str) -> str | None:
    """Check the study's tracking store before its first job (the workflow's onstart): a server
    that does not answer, or a file that is not an MLflow store, is a
    :class:`simflow.tracking.TrackingStoreError` naming it and what to do. Returns the URI
    checked, None when tracking is off. Reads only; MLflow itself is not imported."""
    # lazy: tracking (~40 ms of stdlib) stays out of the Snakefile's parse of the study
    from simflow.tracking import check_tracking_store

    if not tracking.get("enabled", True):
        return None
    uri = _tracking_uri(tracking.get("tracking_uri"), results_root)
    check_tracking_store(uri)
    return uri


def init_study_tracking(study_name: str, results_root: str, out: str | Path, *,
                        experiment: str | None = None, tracking_uri: str | None = None,
                        enabled: bool = True) -> str:
    """Create the MLflow store, the experiment (default: the study name) and the study's parent
    run; write its id to ``out`` and return it. With ``enabled=False`` only a marker is written.

    The study's parent run is never replaced silently:

    * ``out`` names a run that the store lacks or holds deleted: a
      :class:`simflow.tracking.MissingRunError` saying so and how to go on (restore it, use the
      store that holds it, or delete ``out`` to start afresh); nothing is created;
    * ``out`` is missing (deleted by hand, or removed by Snakemake, which re-runs the rule that
      writes it when the study's tracking settings change): the study's last parent run, kept in
      :data:`~simflow.contracts.PARENT_RUN_RECORD` beside ``out``, is reused when it lives in the
      same store and experiment; otherwise a new parent run is created, tagged
      ``simflow.previous_parent_run``, and a message says where the old one is (left as it is)
      and what was created.
    """
    # lazy: tracking (~40 ms of stdlib) stays out of the Snakefile's parse of the study
    from simflow import tracking

    if not enabled:
        tracking.write_run_id_file(out, None)
        return ""
    uri = _tracking_uri(tracking_uri, results_root)
    experiment = experiment or study_name
    out = Path(out)
    record_path = out.with_name(PARENT_RUN_RECORD)
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except ValueError:  # a damaged record: it only ever informs
        record = {}
    earlier = record.get("run_id") if not out.is_file() else None
    same_place = record.get("tracking_uri") == uri and record.get("experiment") == experiment
    tags = {"results": f"{results_root}/{study_name}"}
    if earlier:
        tags["simflow.previous_parent_run"] = f"{earlier} ({record.get('tracking_uri')}, experiment {record.get('experiment')})"
    run_id = tracking.init_study(uri, experiment, study_name, out, tags=tags, missing_run="error",
                                 known_run_id=earlier if same_place else None)
    if earlier == run_id:
        print(f"MLflow: {out} was missing; the study's parent run {run_id} (from {record_path}) is still "
              f"in {uri}: reused, its id written again", file=sys.stderr)
    elif earlier:
        where = ("is no longer live in this store (missing or deleted)" if same_place else
                 f"is in store {record.get('tracking_uri')}, experiment {record.get('experiment')!r}")
        print(f"MLflow: {out} was missing (removed by hand, or by Snakemake after the study's tracking "
              f"settings changed). The study's earlier parent run {earlier} {where}; it is left as it "
              f"is. Created a new parent run {run_id} in {uri} (experiment {experiment!r}, tagged "
              "simflow.previous_parent_run); units set up before keep their runs under the earlier one "
              "until they are set up again.", file=sys.stderr)
    write_json(record_path, {"run_id": run_id, "tracking_uri": uri, "experiment": experiment})
    return run_id


def set_study_run_status(status: str, results_root: str, run_id_file: str | Path, *,
                         tracking_uri: str | None = None) -> str | None:
    """Set the status of the study's parent run (named by ``run_id_file``): the workflow marks
    it RUNNING when an invocation starts work and FINISHED or FAILED when it ends. Returns the
    run id, or None when there is no run yet or tracking is disabled."""
    # lazy: tracking (~40 ms of stdlib) stays out of the Snakefile's parse of the study
    from simflow import tracking

    return tracking.set_run_status(_tracking_uri(tracking_uri, results_root), Path(run_id_file), status)


def setup_unit(cfg: Mapping[str, Any], config_path: str | Path, run_id_path: str | Path,
               parent_run_id_path: str | Path, *, run_name: str,
               tags: Mapping[str, Any] | None = None) -> str | None:
    """Prepare a unit folder for its stages: write the resolved config, and create (or reuse)
    the unit's MLflow child run, writing its id to ``run_id_path``.

    A unit folder remembers the fingerprint of its last config and run (``.setup.json``). The
    same config again (e.g. the outputs were deleted) reuses the MLflow run and the resumable
    checkpoints; a *changed* config gets a new run, and an existing ``checkpoints/`` folder is
    moved to ``checkpoints.superseded-<old fingerprint>`` so that training does not resume from
    weights of another configuration. Returns the run id (None when tracking is disabled).
    """
    # lazy: tracking (~40 ms of stdlib) stays out of the Snakefile's parse of the study
    from simflow import tracking

    full = resolved_config(cfg)
    run_dir = Path(full.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(cfg)
    state_path = run_dir / SETUP_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    old = state.get("fingerprint")
    if old is not None and old != fingerprint:
        ckpt = run_dir / "checkpoints"
        if ckpt.exists():
            target = run_dir / f"checkpoints.superseded-{old[:12]}"
            if target.exists():
                shutil.rmtree(target)
            ckpt.rename(target)
            print(f"config changed: moved {ckpt} to {target} (no resume from another config)",
                  file=sys.stderr)
    write_stage_config(cfg, config_path)

    run_id: str | None = None
    if full.tracking.enabled:
        run_id = tracking.init_variant_run(
            _tracking_uri(full.tracking.tracking_uri, full.results_root), full.tracking.experiment,
            Path(parent_run_id_path), run_name, Path(run_id_path), variant=full.variant,
            tags={**(tags or {}), "config_sha256": fingerprint},
            # the same config as last time: its run, unless the store no longer holds it
            known_run_id=state.get("run_id") if old == fingerprint else None)
    else:
        tracking.write_run_id_file(run_id_path, None)
    write_json(state_path, {"fingerprint": fingerprint, "run_id": run_id})
    return run_id
