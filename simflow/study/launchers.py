"""Which launcher each stage of a study gets, and what the preflight rehearses with which one.

The launcher is not part of a unit's config (switching from a laptop to SLURM must not re-run
finished work): each stage gets it as ``--set launcher.<key>=<value>``
(:func:`simflow.study.snakemake.launcher_sets`). Precedence, lowest first: ``launcher`` ←
``stage_launcher[<stage>]`` ← flat keys ``launcher_<key>`` ← flat keys
``launcher_<stage>_<key>`` (stage names with ``_``). The flat keys exist for Snakemake profiles
and ``--config``, which cannot set nested values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from simflow.config import ConfigError, LauncherSection, deep_merge, from_dict, to_dict
from simflow.contracts import FROZEN_MODES
from simflow.study.spec import Study, StudyError, get_key, stage_key
from simflow.study.units import pretrain_unit, pretrained_vae_path, variant_unit

__all__ = [
    "launcher_for",
    "preflight_launcher",
    "preflight_launcher_sets",
    "preflight_plan",
    "preflight_sets",
    "preflight_units",
    "world_size",
]

#: The rehearsal's own launcher keys, over the rehearsed stage's launcher: one node and (at most)
#: one GPU, no requeue (a rehearsal that runs out of time is a finding, not work to resume), and
#: at most an hour (see :func:`preflight_launcher`).
_PREFLIGHT_LAUNCHER: dict[str, Any] = {"nodes": 1, "tasks_per_node": None, "max_num_timeout": 0}
_PREFLIGHT_TIMEOUT_MIN = 60


def launcher_for(study: Study, stage: str) -> dict:
    """The full launcher section of ``stage`` (validated), merged in precedence order. The
    ``preflight`` stage's is :func:`preflight_launcher` of ``train``."""
    stage = stage_key(stage)
    if stage == "preflight":
        return preflight_launcher(study, "train")
    merged = deep_merge(study.launcher, study.stage_launcher.get(stage, {}))
    merged = deep_merge(merged, study.flat_launcher.get("*", {}))
    merged = deep_merge(merged, study.flat_launcher.get(stage, {}))
    # submitit's job folders live with the study unless a log_dir is configured
    merged.setdefault("log_dir", f"{study.dir}/logs/submitit")
    try:
        return to_dict(from_dict(LauncherSection, merged, "launcher"))
    except ConfigError as err:
        raise StudyError(f"launcher of stage {stage}: {err}") from None


def world_size(launcher: Mapping[str, Any]) -> int:
    """Ranks of a job with this launcher section: nodes × tasks per node (one per GPU, else 1)."""
    tasks = launcher.get("tasks_per_node")
    return int(launcher["nodes"]) * int(tasks if tasks is not None else max(1, launcher["gpus_per_node"]))


def preflight_launcher(study: Study, rehearsed: str) -> dict:
    """The launcher of the rehearsal of stage ``rehearsed`` (``train`` or ``pretrain-vae``): that
    stage's own launcher (backend, partition, account, constraint, CPUs, memory, setup lines),
    on one node with one GPU (none where the real stage has none), no requeue, and a time limit
    of the real one's but at most an hour; then ``stage_launcher.preflight`` and the flat
    ``launcher_preflight_<key>`` keys."""
    real = launcher_for(study, rehearsed)
    merged = {**real, **_PREFLIGHT_LAUNCHER, "gpus_per_node": min(1, real["gpus_per_node"]),
              "timeout_min": min(_PREFLIGHT_TIMEOUT_MIN, real["timeout_min"])}
    merged = deep_merge(merged, study.stage_launcher.get("preflight", {}))
    merged = deep_merge(merged, study.flat_launcher.get("preflight", {}))
    try:
        return to_dict(from_dict(LauncherSection, merged, "launcher"))
    except ConfigError as err:
        raise StudyError(f"launcher of stage preflight: {err}") from None


def preflight_units(study: Study) -> dict[str, str]:
    """The units the preflight rehearses → the stage each one rehearses: every variant with the
    study's first seed (the other seeds have the same sizes), and the shared pretrained VAE
    (first seed) when frozen variants use it."""
    units = {variant_unit(v, study.seeds[0]): "train" for v in study.variants}
    if study.pretrain_seeds:
        units[pretrain_unit(study.pretrain_seeds[0])] = "pretrain-vae"
    return units


def preflight_sets(study: Study, unit: str) -> list[str]:
    """``preflight.<key>=<json>`` for the rehearsal of ``unit``: the stage it rehearses, the
    study's ``preflight.steps`` and ``preflight.cpu_overrides``, and the world size of the real
    stage's launcher (whose per-GPU batch the rehearsal runs)."""
    stage = preflight_units(study)[unit]
    values = {"stage": stage, "steps": study.preflight["steps"],
              "target_world_size": world_size(launcher_for(study, stage)),
              "cpu_overrides": study.preflight["cpu_overrides"]}
    return [f"preflight.{k}={json.dumps(v)}" for k, v in values.items()]


def preflight_launcher_sets(study: Study, unit: str) -> list[str]:
    """``launcher.<key>=<json>`` of the rehearsal of ``unit`` (see :func:`preflight_launcher`)."""
    launcher = preflight_launcher(study, preflight_units(study)[unit])
    return [f"launcher.{k}={json.dumps(v)}" for k, v in launcher.items()]


def preflight_plan(study: Study) -> list[dict]:
    """What the preflight report needs beyond the rehearsals' own rows, one entry per rehearsed
    unit: its name, group, how many runs of it the study has (seeds), the unit it waits for
    (frozen variants: the pretrained VAE), and the real stage's launcher (layout, time limit,
    requeues) to project and check the full runs against."""
    pretrain_path = {pretrained_vae_path(study, s) for s in study.seeds}
    plan = []
    for unit, stage in preflight_units(study).items():
        launcher = launcher_for(study, stage)
        if stage == "pretrain-vae":
            name, group, runs, after = "pretrain_vae", "shared", len(study.pretrain_seeds), None
        else:
            name = unit.rsplit("/", 1)[0]
            group, runs = study.variants[name].group, len(study.seeds)
            cfg = study.units[unit]
            after = ("pretrain_vae" if get_key(cfg, "model.mode") in FROZEN_MODES
                     and get_key(cfg, "model.pretrained_vae") in pretrain_path else None)
        plan.append({"unit": unit, "name": name, "stage": stage, "group": group, "runs": runs,
                     "after": after, "world_size": world_size(launcher),
                     "launcher": {k: launcher[k] for k in ("backend", "nodes", "gpus_per_node",
                                                           "timeout_min", "signal_delay_s",
                                                           "max_num_timeout")}})
    return plan
