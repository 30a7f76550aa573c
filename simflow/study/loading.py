"""Reading a study config: the one validation of a study, before anything else uses it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from simflow.config import ConfigError, read_yaml
from simflow.contracts import STAGES
from simflow.study.launchers import launcher_for, preflight_launcher
from simflow.study.spec import Study, StudyError, parse_study
from simflow.study.units import build_units

__all__ = ["check_config_files", "load_study"]


def load_study(source: str | Path | Mapping[str, Any]) -> Study:
    """Read (a YAML path) or take (a mapping, e.g. Snakemake's ``config``) a study config and
    validate it completely: its own keys (:func:`simflow.study.spec.parse_study`), every
    stage's launcher, and every unit's merged stage config (:func:`simflow.config.from_dict`
    and :func:`simflow.config.validate`). Errors are :class:`StudyError` naming the key."""
    if isinstance(source, (str, Path)):
        try:
            raw = read_yaml(source, "study config") or {}
        except ConfigError as err:
            raise StudyError(str(err)) from None
    else:
        raw = copy.deepcopy(dict(source))
    study = parse_study(raw)
    for stage in STAGES:  # every stage's launcher must be valid, not only the ones run first
        launcher_for(study, stage)
    preflight_launcher(study, "pretrain-vae")
    study.units = build_units(study)
    return study


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Read every config file Snakemake was given (``--configfile``, or the default
    ``config/config.yaml``) strictly, as :func:`load_study` reads a path: Snakemake parses them
    itself with PyYAML's default, where a key given twice silently keeps the last value. A
    duplicated key (or a syntax error) is a :class:`StudyError` naming file, line and column."""
    for path in paths:
        try:
            read_yaml(path, "config file")
        except ConfigError as err:
            raise StudyError(str(err)) from None
