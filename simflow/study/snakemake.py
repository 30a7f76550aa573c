"""What the workflow's rules take from a study: command lines, ``--set`` arguments, threads, and
a ``params`` value that Snakemake's rerun trigger ignores (:class:`Untracked`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from simflow.contracts import STAGES
from simflow.study.launchers import launcher_for
from simflow.study.spec import DEFAULT_CLI, Study

__all__ = ["Untracked", "launcher_sets", "profile_config_dropped", "stage_command", "stage_server_off",
           "stage_threads"]


class Untracked:
    """A Snakemake ``params`` value that does not take part in the params rerun trigger.

    Snakemake records only params of builtin types (str, int, list, dict, ...) and skips the
    rest when it decides whether a job's parameters changed; an instance of this class renders
    as ``text`` in a shell command. Used for the launcher arguments and the CLI command: moving
    a finished study from a laptop to SLURM must not re-run it.
    """

    def __init__(self, text: str) -> None:
        self.text = str(text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Untracked({self.text!r})"


def stage_command(study: Study, stage: str) -> str:
    """The shell command prefix that runs ``stage``: the CLI plus, for submitit backends, the
    CPU thread count of the job (sbatch exports the submitting environment, in which Snakemake
    set OMP_NUM_THREADS to the waiting rule's single thread)."""
    launcher = launcher_for(study, stage)
    prefix = ""
    if launcher["backend"] != "local":
        n = launcher["cpus_per_task"]
        prefix = f"env OMP_NUM_THREADS={n} MKL_NUM_THREADS={n} "
    return f"{prefix}{study.cli} {stage}"


def profile_config_dropped(argv: Sequence[str], config: Mapping[str, Any]) -> bool:
    """True when a Snakemake command line names a profile and also ``--config`` without any
    ``launcher_*`` key: Snakemake then ignores the profile's ``config:`` (the command line
    replaces the whole option), so a profile's ``launcher_backend: slurm`` is lost."""
    args = list(argv)
    has_profile = any(a == "--profile" or a.startswith("--profile=") for a in args)
    has_config = any(a in ("--config", "-C") or a.startswith("--config=") for a in args)
    return has_profile and has_config and not any(str(k).startswith("launcher_") for k in config)


def stage_threads(study: Study, stage: str) -> int:
    """Snakemake threads of a stage rule: ``threads`` when the stage runs on this machine
    in-process, 1 when the rule only waits for a submitit job."""
    return study.threads if launcher_for(study, stage)["backend"] == "local" else 1


def launcher_sets(study: Study, stage: str) -> list[str]:
    """``launcher.<key>=<json>`` for every launcher key of ``stage``: the stage's ``--set``
    arguments (JSON is valid YAML). All keys, not only non-defaults: the config file a stage
    reads may already hold a launcher section (the train stage saves its resolved config,
    launcher included, over the unit's config.yaml), which must not leak into later stages."""
    return [f"launcher.{k}={json.dumps(v)}" for k, v in launcher_for(study, stage).items()]


def stage_server_off(study: Study) -> str | None:
    """Why the workflow runs no stage server (:mod:`simflow.stage_server`) for ``study``, or
    None when it does: the study turned it off, no stage runs with the local launcher (a
    submitting stage imports neither torch nor MLflow), or the study's ``cli`` is not the
    default one (the server runs Snakemake's own Python, which another command may not be)."""
    if not study.stage_server:
        return "stage_server: false"
    if all(launcher_for(study, stage)["backend"] != "local" for stage in STAGES):
        return "no stage runs with launcher.backend local"
    if study.cli != DEFAULT_CLI:
        return f"cli is {study.cli!r}, not {DEFAULT_CLI!r}"
    return None
