"""A study: one base stage configuration, named variants, seeds, and how its stages are launched.

A *study config* (``config/*.yaml``, read by the Snakefile) is::

    study: demo                   # results/<study>/, MLflow experiment <study>
    results_root: results
    seeds: [0]
    base: {data: ..., vae: ..., flow: ..., model: ..., train: ..., sample: ..., eval: ...}
    pretrain_vae: {vae: {posterior: learnable}, train: {steps: 400}}  # the shared frozen VAE
    variants:
      simflow:   {group: latent, sigma: 0.5, overrides: {vae: {posterior: fixed}}}
      frozen_vae: {group: latent, sigma: null, overrides: {model: {mode: frozen_vae}}}
    launcher: {backend: local, cpus_per_task: 8, ...}      # simflow.config.LauncherSection
    stage_launcher: {train: {nodes: 2, gpus_per_node: 8}}  # per-stage launcher overrides
    tracking: {enabled: true, tracking_uri: null, experiment: null}

By concern:

* :mod:`~simflow.study.spec`: the study's own keys as typed sections, read with the stage
  config's validator (:func:`simflow.config.from_dict`), and the :class:`Study` they make;
* :mod:`~simflow.study.loading`: :func:`load_study`, the one validation of a study;
* :mod:`~simflow.study.units`: each unit's explicit stage config (unit folders, shared units);
* :mod:`~simflow.study.launchers`: each stage's launcher, and what the preflight rehearses;
* :mod:`~simflow.study.unit_folder`: a unit's resolved config file and its MLflow run;
* :mod:`~simflow.study.snakemake`: what the workflow's rules take (commands, ``--set`` args);
* :mod:`~simflow.study.schema`: the JSON schema and key tables, generated from the sections;
* :mod:`~simflow.study.cli`: ``python -m simflow.study check|init-study|run-status|schema|keys``.

The names re-exported here are what the workflow (``workflow/rules/common.smk``: ``from simflow
import study as sf``), its scripts and the preflight use.
"""

from simflow.study.cli import main
from simflow.study.launchers import (
    launcher_for,
    preflight_launcher,
    preflight_launcher_sets,
    preflight_plan,
    preflight_sets,
    preflight_units,
)
from simflow.study.loading import check_config_files, load_study
from simflow.study.schema import keys_markdown, study_schema
from simflow.study.snakemake import (
    Untracked,
    launcher_sets,
    profile_config_dropped,
    stage_command,
    stage_server_off,
    stage_threads,
)
from simflow.study.spec import GROUPS, Study, StudyError, Variant, get_key
from simflow.study.unit_folder import (
    check_study_store,
    config_fingerprint,
    init_study_tracking,
    set_study_run_status,
    setup_unit,
    write_stage_config,
)
from simflow.study.units import (
    pipeline_configs,
    resolved_config,
    shared_config,
    unit_run_name,
    unit_tags,
    variant_config,
    variant_unit,
)

__all__ = [
    "GROUPS",
    "Study",
    "StudyError",
    "Untracked",
    "Variant",
    "check_config_files",
    "check_study_store",
    "config_fingerprint",
    "get_key",
    "init_study_tracking",
    "keys_markdown",
    "launcher_for",
    "launcher_sets",
    "load_study",
    "main",
    "pipeline_configs",
    "preflight_launcher",
    "preflight_launcher_sets",
    "preflight_plan",
    "preflight_sets",
    "preflight_units",
    "profile_config_dropped",
    "resolved_config",
    "set_study_run_status",
    "setup_unit",
    "shared_config",
    "stage_command",
    "stage_server_off",
    "stage_threads",
    "study_schema",
    "unit_run_name",
    "unit_tags",
    "variant_config",
    "variant_unit",
    "write_stage_config",
]
