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

Every *unit* of work has its own folder ``<results_root>/<study>/<unit>/`` holding its resolved
stage config (``config.yaml``), its MLflow run id (``mlflow_run_id.txt``) and the stage outputs:

* ``<variant>/s<seed>``: one variant trained with one seed;
* ``_shared/feature_extractor``: the demo's classifier (FID feature proxy, REPA target);
* ``_shared/fid_ref``: the FID reference statistics;
* ``_shared/pretrain_vae/s<seed>``: the pretrained VAE used by the frozen variants.

The launcher is not part of a unit's config (switching from a laptop to SLURM must not re-run
finished work): each stage gets it as ``--set launcher.<key>=<value>`` (:func:`launcher_sets`).
Precedence, lowest first: ``launcher`` ← ``stage_launcher[<stage>]`` ← flat keys
``launcher_<key>`` ← flat keys ``launcher_<stage>_<key>`` (stage names with ``_``). The flat
keys exist for Snakemake profiles and ``--config``, which cannot set nested values.

Command line (what the workflow's rules call)::

    python -m simflow.study check config/demo.yaml [...]   # validate, list variants and units
    python -m simflow.study init-study --study demo --results-root results --out F [--running]
    python -m simflow.study run-status RUNNING|FINISHED|FAILED --results-root results --run-id-file F
    python -m simflow.study schema > workflow/schemas/config.schema.yaml
    python -m simflow.study keys                            # Markdown table of the stage keys
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simflow.config import (
    Config,
    ConfigError,
    LauncherSection,
    deep_merge,
    describe,
    from_dict,
    json_schema,
    read_yaml,
    to_dict,
    validate,
)

__all__ = [
    "FROZEN_MODES",
    "GROUPS",
    "SHARED_DIR",
    "STAGES",
    "STAGE_OUTPUTS",
    "Study",
    "StudyError",
    "Untracked",
    "Variant",
    "config_fingerprint",
    "get_key",
    "init_study_tracking",
    "launcher_for",
    "launcher_sets",
    "preflight_launcher",
    "preflight_launcher_sets",
    "preflight_plan",
    "preflight_sets",
    "preflight_units",
    "load_study",
    "profile_config_dropped",
    "resolved_config",
    "set_study_run_status",
    "setup_unit",
    "shared_config",
    "stage_command",
    "stage_threads",
    "study_schema",
    "unit_configs",
    "unit_run_name",
    "unit_tags",
    "variant_config",
    "world_size",
    "write_stage_config",
]

log = logging.getLogger(__name__)

#: The stages of ``simflow <stage>``, in DAG order (``preflight`` rehearses the training stages
#: before anything else runs; see :func:`preflight_units`).
STAGES: tuple[str, ...] = (
    "preflight", "feature-extractor", "fid-ref", "pretrain-vae", "train", "sample", "fid", "reconstruct",
    "nll", "latents",
)
#: Final outputs of each stage, relative to the unit folder (the stage contract).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "preflight": ("preflight/preflight.json",),
    "feature-extractor": ("classifier.pt", "classifier.json"),
    "fid-ref": ("reference_stats.npz",),
    "pretrain-vae": ("vae.pt", "train_summary.json"),
    "train": ("model.pt", "train_summary.json"),
    "sample": ("samples.npz", "samples.png"),
    "fid": ("metrics/fid.json",),
    "reconstruct": ("metrics/reconstruct.json", "interpolation.npz"),
    "nll": ("metrics/nll.json",),
    "latents": ("latents.npz",),
}
#: Variant groups: ``sigma_sweep`` variants form the σ̄ curve of Figure 5; ``rate_sweep``
#: variants the curve over the decoder scale (the rate weight); ``pixel`` variants have no VAE
#: latents.
GROUPS: tuple[str, ...] = ("latent", "sigma_sweep", "rate_sweep", "pixel")
#: Model modes that consume the shared pretrained VAE.
FROZEN_MODES: tuple[str, ...] = ("frozen_vae", "frozen_encoder")
#: Folder (inside results/<study>/) of the units shared by all variants.
SHARED_DIR = "_shared"
#: File names inside a unit folder written by the workflow itself.
CONFIG_FILE = "config.yaml"
RUN_ID_FILE = "mlflow_run_id.txt"
PARENT_RUN_ID_FILE = "mlflow_parent_run_id.txt"
_SETUP_STATE = ".setup.json"

# Names: a variant becomes a folder, a Snakemake wildcard value and an MLflow run name.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED = {"figures", "logs", "preflight"}
# Config keys the workflow sets itself; a study must not set them in base/overrides.
_WORKFLOW_KEYS = ("study", "variant", "run_dir", "results_root", "launcher", "tracking", "preflight",
                  "train.seed", "sample.seed")
# Inputs of the shared stages: identical for every variant, so variants may not override them.
_SHARED_KEYS = ("data", "eval.feature_extractor", "eval.feature_extractor_weights_path",
                "eval.classifier_path", "eval.reference_stats", "eval.num_reference",
                "eval.classifier_steps")
# VAE keys that fix the architecture of a frozen variant's VAE: they must match the pretrained one.
_VAE_ARCH_KEYS = ("latent_channels", "base_channels", "channel_mult", "num_res_blocks",
                  "attn_resolutions", "posterior")
_STUDY_KEYS = ("study", "results_root", "seeds", "cli", "threads", "base", "pretrain_vae", "preflight",
               "variants", "only_variants", "launcher", "stage_launcher", "tracking", "analysis")
_LAUNCHER_FIELDS = tuple(f.name for f in dataclasses.fields(LauncherSection))
_TRACKING_KEYS = ("enabled", "tracking_uri", "experiment")
_ANALYSIS_DEFAULTS: dict[str, Any] = {
    "sweep_reference": "simflow",
    "grid_images": 32,
    "claims": {"simflow": "simflow", "frozen_vae": "frozen_vae",
               "e2e_learnable": "e2e_learnable", "simflow_repa": "simflow_repa",
               "simflow_equal_updates": "simflow_equal_updates"},
    "paper_mapping": {"simflow": "SimFlow", "simflow_repa": "SimFlow + REPA-E",
                      "frozen_encoder_noise": "STARFlow", "tarflow_pixel": "TarFlow"},
}
#: The study's ``preflight:`` section: rehearsal steps per training unit, and stage-config
#: overrides for a rehearsal that runs on a CPU (see :func:`preflight_sets`).
_PREFLIGHT_DEFAULTS: dict[str, Any] = {"steps": 200, "cpu_overrides": {}}
#: The rehearsal's own launcher keys, over the rehearsed stage's launcher: one node and (at most)
#: one GPU, no requeue (a rehearsal that runs out of time is a finding, not work to resume), and
#: at most an hour (see :func:`preflight_launcher`).
_PREFLIGHT_LAUNCHER: dict[str, Any] = {"nodes": 1, "tasks_per_node": None, "max_num_timeout": 0}
_PREFLIGHT_TIMEOUT_MIN = 60
_DEFAULT_CLI = "python3 -m simflow"  # python3: plain Debian has no `python`


class StudyError(ConfigError):
    """A study config problem; the message names the study key (and variant) and the fix."""


@dataclass(frozen=True)
class Variant:
    """One entry of ``variants:``: a named partial stage config applied on top of ``base``.

    ``sigma`` is σ̄ of the fixed posterior as plotted in Figure 5 (None where no fixed σ̄
    applies); ``group`` is one of :data:`GROUPS`.
    """

    name: str
    group: str
    sigma: float | None
    overrides: dict
    description: str = ""


@dataclass
class Study:
    """A validated study config (see the module docstring for the keys).

    ``launcher`` is the study-wide launcher section (a full :class:`LauncherSection` mapping);
    ``stage_launcher`` maps stage names to partial launcher sections; ``flat_launcher`` holds
    the ``launcher_*`` keys from profiles and ``--config``. ``units`` maps every unit path
    (relative to the study folder) to its explicit, validated stage config.
    """

    name: str
    results_root: str
    seeds: list[int]
    base: dict
    pretrain_vae: dict
    variants: dict[str, Variant]
    launcher: dict
    stage_launcher: dict[str, dict]
    flat_launcher: dict[str, dict]
    tracking: dict
    analysis: dict
    cli: str = _DEFAULT_CLI
    threads: int = 1
    units: dict[str, dict] = field(default_factory=dict)
    preflight: dict = field(default_factory=lambda: dict(_PREFLIGHT_DEFAULTS))

    # -- paths ---------------------------------------------------------------------------------
    @property
    def dir(self) -> str:
        """``<results_root>/<study>``: the study's folder."""
        return f"{self.results_root}/{self.name}"

    def unit_dir(self, unit: str) -> str:
        return f"{self.dir}/{unit}"

    @property
    def parent_run_id_file(self) -> str:
        return f"{self.dir}/{PARENT_RUN_ID_FILE}"

    @property
    def experiment(self) -> str:
        return self.tracking.get("experiment") or self.name

    # -- what the DAG contains -------------------------------------------------------------------
    @property
    def needs_feature_extractor(self) -> bool:
        """True when some unit reads the classifier the workflow trains (feature-extractor)."""
        return f"{SHARED_DIR}/feature_extractor" in self.units

    @property
    def needs_fid_ref(self) -> bool:
        """True unless ``base.eval.reference_stats`` names precomputed statistics (e.g. ADM's)."""
        return f"{SHARED_DIR}/fid_ref" in self.units

    @property
    def pretrain_seeds(self) -> list[int]:
        """Seeds whose pretrained VAE some frozen variant uses (empty: no pretrain-vae stage)."""
        return sorted(int(m.group(1)) for u in self.units
                      if (m := re.fullmatch(rf"{SHARED_DIR}/pretrain_vae/s(\d+)", u)))


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def variant_unit(variant: str, seed: int) -> str:
    return f"{variant}/s{seed}"


_MISSING = object()


def get_key(d: Mapping, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``; ``default`` when a level is missing."""
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _has(d: Mapping, dotted: str) -> bool:
    """Whether ``dotted`` is set, even to None (get_key alone cannot tell)."""
    return get_key(d, dotted, _MISSING) is not _MISSING


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StudyError(f"{where} must be a mapping, got {value!r}")
    return copy.deepcopy(dict(value))


def _check_partial(partial: dict, where: str) -> None:
    """Validate a partial stage config (unknown keys, types) and forbid workflow-owned keys."""
    for key in _WORKFLOW_KEYS:
        if _has(partial, key):
            hint = {"launcher": "use the study-level `launcher:` / `stage_launcher:` sections",
                    "tracking": "use the study-level `tracking:` section",
                    "preflight": "use the study-level `preflight:` section",
                    "train.seed": "use the study-level `seeds:` list",
                    "sample.seed": "use the study-level `seeds:` list"}.get(
                        key, "the workflow sets it from the study name, variant and seed")
            raise StudyError(f"{where}.{key} must not be set in a study config: {hint}")
    try:
        from_dict(Config, partial)
    except ConfigError as err:
        raise StudyError(f"{where}: {err}") from None


def _stage_key(name: str) -> str:
    """``fid_ref`` / ``fid-ref`` → ``fid-ref`` (raises for unknown stages)."""
    stage = str(name).replace("_", "-")
    if stage not in STAGES:
        raise StudyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return stage


def _split_flat_launcher(raw: Mapping[str, Any]) -> dict[str, dict]:
    """``launcher_<key>`` / ``launcher_<stage>_<key>`` → {"*": {...}, "<stage>": {...}}."""
    out: dict[str, dict] = {}
    stage_prefixes = sorted((s.replace("-", "_") for s in STAGES), key=len, reverse=True)
    for key, value in raw.items():
        if not key.startswith("launcher_"):
            continue
        rest = key[len("launcher_"):]
        if rest in _LAUNCHER_FIELDS:
            out.setdefault("*", {})[rest] = value
            continue
        for prefix in stage_prefixes:
            if rest.startswith(prefix + "_") and rest[len(prefix) + 1:] in _LAUNCHER_FIELDS:
                out.setdefault(_stage_key(prefix), {})[rest[len(prefix) + 1:]] = value
                break
        else:
            raise StudyError(
                f"unknown flat launcher key {key!r}: use launcher_<key> or launcher_<stage>_<key> "
                f"with <key> one of {', '.join(_LAUNCHER_FIELDS)} and <stage> one of "
                f"{', '.join(p for p in stage_prefixes)}")
    return out


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def load_study(source: str | Path | Mapping[str, Any]) -> Study:
    """Read (a YAML path) or take (a mapping, e.g. Snakemake's ``config``) a study config and
    validate it completely: every unit's merged stage config must pass
    :func:`simflow.config.from_dict`. Errors are :class:`StudyError` naming the key."""
    if isinstance(source, (str, Path)):
        try:
            raw = read_yaml(source, "study config") or {}
        except ConfigError as err:
            raise StudyError(str(err)) from None
    else:
        raw = copy.deepcopy(dict(source))
    if not isinstance(raw, dict):
        raise StudyError("a study config must be a mapping at the top level")
    unknown = [k for k in raw if k not in _STUDY_KEYS and not str(k).startswith("launcher_")]
    if unknown:
        raise StudyError(f"unknown study key {unknown[0]!r}; valid keys: {', '.join(_STUDY_KEYS)} "
                         "(and flat launcher_<key> / launcher_<stage>_<key> overrides)")

    name = raw.get("study")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StudyError(f"study: expected a name of letters, digits, '_', '.', '-', got {name!r}")
    results_root = raw.get("results_root", "results")
    if not isinstance(results_root, str) or not results_root.strip():
        raise StudyError(f"results_root: expected a folder path, got {results_root!r}")
    results_root = results_root.rstrip("/") or "/"
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise StudyError(f"seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    cli = raw.get("cli", _DEFAULT_CLI)
    if not isinstance(cli, str) or not cli.strip():
        raise StudyError(f"cli: expected the command that runs the simflow CLI, got {cli!r}")
    threads = raw.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise StudyError(f"threads: expected an integer >= 1, got {threads!r}")

    base = _mapping(raw.get("base"), "base")
    _check_partial(base, "base")
    pretrain = _mapping(raw.get("pretrain_vae"), "pretrain_vae")
    _check_partial(pretrain, "pretrain_vae")

    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise StudyError("variants: expected a non-empty mapping of variant name -> "
                         "{group, sigma, overrides}")
    variants: dict[str, Variant] = {}
    for vname, spec in variants_raw.items():
        variants[str(vname)] = _parse_variant(str(vname), spec)
    # An overlay cannot remove variants (Snakemake merges config files key by key): it names the
    # ones to run instead.
    only = raw.get("only_variants")
    if only is not None:
        if not isinstance(only, list) or not only or not all(isinstance(v, str) for v in only):
            raise StudyError(f"only_variants: expected a non-empty list of variant names, got {only!r}")
        missing = [v for v in only if v not in variants]
        if missing:
            raise StudyError(f"only_variants: {missing[0]!r} is not a variant of the study; variants: "
                             f"{', '.join(variants)}")
        variants = {v: variants[v] for v in variants if v in only}

    launcher = _mapping(raw.get("launcher"), "launcher")
    stage_launcher = {_stage_key(k): _mapping(v, f"stage_launcher.{k}")
                      for k, v in _mapping(raw.get("stage_launcher"), "stage_launcher").items()}
    flat = _split_flat_launcher(raw)
    tracking = _mapping(raw.get("tracking"), "tracking")
    bad = [k for k in tracking if k not in _TRACKING_KEYS]
    if bad:
        raise StudyError(f"unknown key tracking.{bad[0]}; valid keys: {', '.join(_TRACKING_KEYS)} "
                         "(the run id files are set by the workflow)")
    tracking = {"enabled": True, "tracking_uri": None, "experiment": None, **tracking}
    if not isinstance(tracking["enabled"], bool):
        raise StudyError(f"tracking.enabled: expected true/false, got {tracking['enabled']!r}")
    for key in ("tracking_uri", "experiment"):
        if tracking[key] is not None and not isinstance(tracking[key], str):
            raise StudyError(f"tracking.{key}: expected a string or null, got {tracking[key]!r}")
    analysis = deep_merge(_ANALYSIS_DEFAULTS, _mapping(raw.get("analysis"), "analysis"))
    bad = [k for k in analysis if k not in _ANALYSIS_DEFAULTS]
    if bad:
        raise StudyError(f"unknown key analysis.{bad[0]}; valid keys: {', '.join(_ANALYSIS_DEFAULTS)}")

    preflight = _parse_preflight(raw.get("preflight"))

    study = Study(name=name, results_root=results_root, seeds=list(seeds), base=base,
                  pretrain_vae=pretrain, variants=variants, launcher=launcher,
                  stage_launcher=stage_launcher, flat_launcher=flat, tracking=tracking,
                  analysis=analysis, cli=cli.strip(), threads=threads, preflight=preflight)
    for stage in STAGES:  # every stage's launcher must be valid, not only the ones run first
        launcher_for(study, stage)
    preflight_launcher(study, "pretrain-vae")
    study.units = _build_units(study)
    return study


def _parse_preflight(spec: Any) -> dict:
    preflight = deep_merge(_PREFLIGHT_DEFAULTS, _mapping(spec, "preflight"))
    bad = [k for k in preflight if k not in _PREFLIGHT_DEFAULTS]
    if bad:
        raise StudyError(f"unknown key preflight.{bad[0]}; valid keys: {', '.join(_PREFLIGHT_DEFAULTS)}")
    steps = preflight["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise StudyError(f"preflight.steps: expected an integer >= 1, got {steps!r}")
    cpu = _mapping(preflight["cpu_overrides"], "preflight.cpu_overrides")
    _check_partial(cpu, "preflight.cpu_overrides")
    for key in ("data.name", "data.root"):
        if _has(cpu, key):
            raise StudyError(f"preflight.cpu_overrides.{key}: the rehearsal reads (and checks) the "
                             "study's own dataset; it may shrink the model, not change the data")
    preflight["cpu_overrides"] = cpu
    return preflight


def _parse_variant(name: str, spec: Any) -> Variant:
    where = f"variants.{name}"
    if not _NAME_RE.fullmatch(name) or name in _RESERVED:
        raise StudyError(f"{where}: a variant name must be letters, digits, '_', '.', '-', start "
                         f"with a letter or digit, and not be one of {sorted(_RESERVED)}")
    if not isinstance(spec, Mapping):
        raise StudyError(f"{where}: expected a mapping with keys group, sigma, overrides")
    bad = [k for k in spec if k not in ("group", "sigma", "overrides", "description")]
    if bad:
        raise StudyError(f"unknown key {where}.{bad[0]}; valid keys: group, sigma, overrides, description")
    group = spec.get("group", "latent")
    if group not in GROUPS:
        raise StudyError(f"{where}.group: {group!r} is not one of {list(GROUPS)}")
    sigma = spec.get("sigma")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0):
        raise StudyError(f"{where}.sigma: expected a positive number or null, got {sigma!r}")
    overrides = _mapping(spec.get("overrides"), f"{where}.overrides")
    _check_partial(overrides, f"{where}.overrides")
    for key in _SHARED_KEYS:
        if _has(overrides, key):
            raise StudyError(f"{where}.overrides.{key}: shared by all variants (an input of the "
                             "feature-extractor / fid-ref stages); set it in `base:` instead")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise StudyError(f"{where}.description: expected a string")
    return Variant(name=name, group=group, sigma=None if sigma is None else float(sigma),
                   overrides=overrides, description=description)


# ------------------------------------------------------------------------------------------
# unit configs
# ------------------------------------------------------------------------------------------
def _identity(study: Study, cfg: dict, variant: str, unit: str) -> dict:
    cfg["study"] = study.name
    cfg["variant"] = variant
    cfg["run_dir"] = study.unit_dir(unit)
    cfg["results_root"] = study.results_root
    cfg["tracking"] = {
        "enabled": study.tracking["enabled"],
        "tracking_uri": study.tracking["tracking_uri"],
        "experiment": study.experiment,
        "run_id_file": f"{study.unit_dir(unit)}/{RUN_ID_FILE}",
    }
    return cfg


def _shared_paths(study: Study) -> dict[str, str]:
    return {
        "classifier": f"{study.dir}/{SHARED_DIR}/feature_extractor/{STAGE_OUTPUTS['feature-extractor'][0]}",
        "reference_stats": f"{study.dir}/{SHARED_DIR}/fid_ref/{STAGE_OUTPUTS['fid-ref'][0]}",
    }


def _pretrain_unit(seed: int) -> str:
    return f"{SHARED_DIR}/pretrain_vae/s{seed}"


def _link_shared(study: Study, cfg: dict, seed: int | None) -> dict:
    """Point the eval/model paths that nobody set explicitly at the shared stage outputs."""
    paths = _shared_paths(study)
    defaults = Config()
    fe = get_key(cfg, "eval.feature_extractor") or defaults.eval.feature_extractor
    if fe == "simflow-classifier" and get_key(cfg, "eval.classifier_path") is None:
        _set(cfg, "eval.classifier_path", paths["classifier"])
    if get_key(cfg, "eval.reference_stats") is None:
        _set(cfg, "eval.reference_stats", paths["reference_stats"])
    model = cfg.get("model", {})
    if (float(model.get("repa_weight", 0.0) or 0.0) > 0
            and model.get("repa_target", defaults.model.repa_target) == "classifier"
            and model.get("repa_target_weights_path") is None):
        _set(cfg, "model.repa_target_weights_path", paths["classifier"])
    if seed is not None and model.get("mode") in FROZEN_MODES and model.get("pretrained_vae") is None:
        _set(cfg, "model.pretrained_vae", f"{study.unit_dir(_pretrain_unit(seed))}/vae.pt")
    return cfg


def _validated(cfg: dict, where: str) -> dict:
    try:
        validate(from_dict(Config, cfg))
    except ConfigError as err:
        raise StudyError(f"{where}: the merged stage config is invalid: {err}") from None
    return cfg


def variant_config(study: Study, variant: str, seed: int) -> dict:
    """The explicit stage config of ``variant`` trained with ``seed``: ``base`` ← the variant's
    overrides, plus study/variant/run_dir/results_root, ``train.seed = sample.seed = seed``,
    tracking (run id file in the unit folder) and the paths of the shared stage outputs
    (reference statistics, classifier, pretrained VAE) where not set explicitly.

    Keys left out keep the defaults of :class:`simflow.config.Config` (see
    :func:`resolved_config`); the launcher is not included (see :func:`launcher_sets`).
    """
    if variant not in study.variants:
        raise StudyError(f"unknown variant {variant!r}; the study has {', '.join(study.variants)}")
    if seed not in study.seeds:
        raise StudyError(f"seed {seed} is not in the study's seeds {study.seeds}")
    cfg = deep_merge(copy.deepcopy(study.base), copy.deepcopy(study.variants[variant].overrides))
    _set(cfg, "train.seed", seed)
    _set(cfg, "sample.seed", seed)
    _identity(study, cfg, variant, variant_unit(variant, seed))
    _link_shared(study, cfg, seed)
    return _validated(cfg, f"variant {variant!r} (seed {seed})")


def shared_config(study: Study, kind: str, seed: int | None = None) -> dict:
    """The explicit stage config of a shared unit: ``feature_extractor``, ``fid_ref`` or
    ``pretrain_vae`` (with ``seed``).

    The feature extractor and the reference statistics get only the keys they read (``data``,
    ``train.seed`` and the ``eval`` feature keys), so that changing e.g. the flow does not
    retrain the classifier; the pretrained VAE gets ``base`` ← ``pretrain_vae``.
    """
    base = study.base
    if kind == "feature_extractor":
        cfg: dict = {"data": copy.deepcopy(base.get("data", {}))}
        if _has(base, "eval.classifier_steps"):
            _set(cfg, "eval.classifier_steps", get_key(base, "eval.classifier_steps"))
        _set(cfg, "train.seed", 0)
        unit = f"{SHARED_DIR}/feature_extractor"
    elif kind == "fid_ref":
        cfg = {"data": copy.deepcopy(base.get("data", {}))}
        for key in ("feature_extractor", "feature_extractor_weights_path", "classifier_path",
                    "num_reference"):
            if _has(base, f"eval.{key}"):
                _set(cfg, f"eval.{key}", get_key(base, f"eval.{key}"))
        _set(cfg, "train.seed", 0)
        _link_shared(study, cfg, None)
        cfg["eval"].pop("reference_stats", None)  # fid-ref writes it; it does not read it
        unit = f"{SHARED_DIR}/fid_ref"
    elif kind == "pretrain_vae":
        if seed is None:
            raise StudyError("shared_config('pretrain_vae') needs a seed")
        cfg = deep_merge(copy.deepcopy(base), copy.deepcopy(study.pretrain_vae))
        _set(cfg, "train.seed", seed)
        _set(cfg, "sample.seed", seed)
        unit = _pretrain_unit(seed)
    else:
        raise StudyError(f"unknown shared unit {kind!r}: feature_extractor, fid_ref or pretrain_vae")
    _identity(study, cfg, kind, unit)
    return _validated(cfg, f"shared unit {unit}")


def _build_units(study: Study) -> dict[str, dict]:
    units: dict[str, dict] = {}
    for variant in study.variants:
        for seed in study.seeds:
            units[variant_unit(variant, seed)] = variant_config(study, variant, seed)
    for seed in study.seeds:
        wanted = f"{study.unit_dir(_pretrain_unit(seed))}/vae.pt"
        if any(get_key(cfg, "model.mode") in FROZEN_MODES and get_key(cfg, "model.pretrained_vae") == wanted
               for cfg in units.values()):
            units[_pretrain_unit(seed)] = shared_config(study, "pretrain_vae", seed)
    if get_key(study.base, "eval.reference_stats") is None:
        units[f"{SHARED_DIR}/fid_ref"] = shared_config(study, "fid_ref")
    classifier = _shared_paths(study)["classifier"]
    if any(classifier in (get_key(cfg, "eval.classifier_path"), get_key(cfg, "model.repa_target_weights_path"))
           for cfg in units.values()):
        units[f"{SHARED_DIR}/feature_extractor"] = shared_config(study, "feature_extractor")
    _check_frozen_vae(study, units)
    return units


def _check_frozen_vae(study: Study, units: dict[str, dict]) -> None:
    """A frozen variant builds its VAE from its own ``vae`` section and loads the pretrained
    weights into it: the architecture keys must agree."""
    for unit, cfg in units.items():
        if get_key(cfg, "model.mode") not in FROZEN_MODES:
            continue
        seed = get_key(cfg, "train.seed")
        pre_unit = _pretrain_unit(seed)
        if pre_unit not in units or get_key(cfg, "model.pretrained_vae") != f"{study.unit_dir(pre_unit)}/vae.pt":
            continue
        mine = resolved_config(cfg).vae
        theirs = resolved_config(units[pre_unit]).vae
        diff = [k for k in _VAE_ARCH_KEYS if getattr(mine, k) != getattr(theirs, k)]
        if diff:
            variant = unit.split("/")[0]
            raise StudyError(
                f"variants.{variant}: model.mode {get_key(cfg, 'model.mode')} loads the pretrained VAE, "
                f"but its vae.{diff[0]} = {getattr(mine, diff[0])!r} differs from the pretrained "
                f"VAE's {getattr(theirs, diff[0])!r} (base <- pretrain_vae); make vae.{', vae.'.join(diff)} "
                "agree")


def unit_run_name(study: Study, unit: str) -> str:
    """MLflow run name of a unit: ``<variant>_s<seed>``, or ``shared:<stage>`` for a shared unit.

    The seed is always in the name (not only when a study has several seeds): the name is a
    parameter of the unit's set-up rule, so a name that changed when seeds are added would make
    Snakemake retrain every finished seed-0 unit."""
    if unit.startswith(f"{SHARED_DIR}/"):
        return "shared:" + unit[len(SHARED_DIR) + 1:].replace("/", "_")
    variant, seed = unit.rsplit("/", 1)
    return f"{variant}_{seed}"


def unit_tags(study: Study, unit: str) -> dict[str, Any]:
    """MLflow tags of a unit's run: ``unit`` plus ``group``, ``sigma``, ``seed`` for a variant
    or ``shared=true`` for a shared unit."""
    if unit not in study.units:
        raise StudyError(f"unknown unit {unit!r}; the study has {', '.join(study.units)}")
    if unit.startswith(f"{SHARED_DIR}/"):
        return {"unit": unit, "shared": "true"}
    variant, seed = unit.rsplit("/", 1)
    v = study.variants[variant]
    return {"unit": unit, "group": v.group, "sigma": v.sigma, "seed": int(seed[1:])}


def unit_configs(study: Study) -> dict[str, dict]:
    """Every unit path (relative to the study folder) → its explicit stage config."""
    return dict(study.units)


def resolved_config(cfg: Mapping[str, Any]) -> Config:
    """The full :class:`Config` of an explicit unit config (defaults filled in)."""
    return from_dict(Config, copy.deepcopy(dict(cfg)))


# ------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------
def launcher_for(study: Study, stage: str) -> dict:
    """The full launcher section of ``stage`` (validated), merged in precedence order. The
    ``preflight`` stage's is :func:`preflight_launcher` of ``train``."""
    stage = _stage_key(stage)
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
        units[_pretrain_unit(study.pretrain_seeds[0])] = "pretrain-vae"
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
    pretrain_path = {f"{study.unit_dir(_pretrain_unit(s))}/vae.pt" for s in study.seeds}
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


# ------------------------------------------------------------------------------------------
# files and tracking
# ------------------------------------------------------------------------------------------
def config_fingerprint(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the full resolved config (key order and default-filling do not matter)."""
    full = to_dict(resolved_config(cfg))
    full.pop("preflight", None)  # set per rehearsal by the workflow, never part of a unit
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


def write_stage_config(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write the full resolved stage config of ``cfg`` (defaults filled in, launcher left out)
    atomically to ``path``; returns the path."""
    from simflow.io import atomic_write

    full = to_dict(resolved_config(cfg))
    full.pop("launcher", None)
    full.pop("preflight", None)
    header = (f"# Resolved stage config of {full['study']}/{full['variant']} (written by the "
              "workflow; edit config/*.yaml instead).\n# The launcher is passed per stage with "
              "`--set launcher.<key>=...`; without it a stage runs in-process.\n")
    text = header + yaml.safe_dump(full, sort_keys=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _tracking_uri(tracking_uri: str | None, results_root: str) -> str:
    from simflow.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri, results_root)


def init_study_tracking(study_name: str, results_root: str, out: str | Path, *,
                        experiment: str | None = None, tracking_uri: str | None = None,
                        enabled: bool = True) -> str:
    """Create the MLflow store, the experiment (default: the study name) and the study's parent
    run; write its id to ``out`` and return it. With ``enabled=False`` only a marker is written."""
    out = Path(out)
    if not enabled:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("tracking disabled\n")
        return ""
    from simflow import tracking

    uri = _tracking_uri(tracking_uri, results_root)
    tracking.init_tracking_store(uri)
    return tracking.init_study(uri, experiment or study_name, study_name, out,
                               tags={"results": f"{results_root}/{study_name}"})


def set_study_run_status(status: str, results_root: str, run_id_file: str | Path, *,
                         tracking_uri: str | None = None) -> str | None:
    """Set the status of the study's parent run (named by ``run_id_file``): the workflow marks
    it RUNNING when an invocation starts work and FINISHED or FAILED when it ends. Returns the
    run id, or None when there is no run yet or tracking is disabled."""
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
    run_dir = Path(resolved_config(cfg).run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(cfg)
    state_path = run_dir / _SETUP_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    old = state.get("fingerprint")
    run_id_path = Path(run_id_path)
    if old is not None and old != fingerprint:
        ckpt = run_dir / "checkpoints"
        if ckpt.exists():
            target = run_dir / f"checkpoints.superseded-{old[:12]}"
            if target.exists():
                shutil.rmtree(target)
            ckpt.rename(target)
            print(f"config changed: moved {ckpt} to {target} (no resume from another config)",
                  file=sys.stderr)
        state.pop("run_id", None)
    elif old == fingerprint and state.get("run_id") and not run_id_path.exists():
        run_id_path.parent.mkdir(parents=True, exist_ok=True)
        run_id_path.write_text(state["run_id"] + "\n")  # init_variant_run reuses a live run
    write_stage_config(cfg, config_path)

    full = resolved_config(cfg)
    run_id: str | None = None
    if full.tracking.enabled:
        from simflow import tracking

        uri = _tracking_uri(full.tracking.tracking_uri, full.results_root)
        run_id = tracking.init_variant_run(uri, full.tracking.experiment, Path(parent_run_id_path),
                                           run_name, run_id_path,
                                           tags={**(tags or {}), "config_sha256": fingerprint})
    else:
        run_id_path.parent.mkdir(parents=True, exist_ok=True)
        run_id_path.write_text("tracking disabled\n")
    state_path.write_text(json.dumps({"fingerprint": fingerprint, "run_id": run_id}) + "\n")
    return run_id


# ------------------------------------------------------------------------------------------
# schema and docs
# ------------------------------------------------------------------------------------------
def _strip_defaults(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_defaults(v) for k, v in schema.items() if k != "default"}
    if isinstance(schema, list):
        return [_strip_defaults(v) for v in schema]
    return schema


def study_schema() -> dict:
    """The JSON schema (draft 2020-12) of a study config, for Snakemake's ``validate``.

    ``base`` carries the stage defaults; variant overrides and ``pretrain_vae`` carry none (a
    default filled into an override would silently replace the base value).
    """
    stage = json_schema(Config)
    for key in ("study", "variant", "run_dir", "results_root", "launcher", "tracking", "preflight"):
        stage["properties"].pop(key)
    launcher = json_schema(LauncherSection)
    names = {"type": "string", "pattern": f"^{_NAME_RE.pattern}$"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "SimFlow study config",
        "description": "A study: base stage config, variants, seeds, launcher, tracking. "
                       "Generated by `python -m simflow.study schema`; see config/README.md.",
        "type": "object",
        "required": ["study", "base", "variants"],
        "additionalProperties": False,
        "patternProperties": {
            "^launcher_[a-z_]+$": {
                "description": "Flat launcher override for profiles and --config: launcher_<key> "
                               "(every stage) or launcher_<stage>_<key> (stage with '_'); wins "
                               "over launcher and stage_launcher."},
        },
        "properties": {
            "study": {**names, "description": "Study name: results/<study>/ and the MLflow experiment."},
            "results_root": {"type": "string", "default": "results",
                             "description": "Root folder of all studies (holds mlflow.db by default)."},
            "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                      "default": [0], "description": "Training seeds; every variant runs once per seed."},
            "cli": {"type": "string", "default": _DEFAULT_CLI,
                    "description": "Command that runs the simflow CLI on the submit host."},
            "threads": {"type": "integer", "minimum": 1, "default": 1,
                        "description": "CPU threads (OMP_NUM_THREADS) of a stage job run in-process."},
            "base": {**stage, "description": "Partial stage config shared by every variant "
                                             "(simflow.config; keys in config/README.md)."},
            "pretrain_vae": {**_strip_defaults(stage), "default": {},
                             "description": "Overrides of base for the shared pretrained VAE of "
                                            "the frozen variants (learnable posterior)."},
            "only_variants": {
                "anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"type": "null"}],
                "default": None,
                "description": "Run only these variants (in the study's order); null: all. Lets an "
                               "overlay config select a subset.",
            },
            "variants": {
                "type": "object", "minProperties": 1, "propertyNames": names,
                "description": "Variant name -> {group, sigma, overrides, description}.",
                "additionalProperties": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "group": {"enum": list(GROUPS), "default": "latent",
                                  "description": "latent | sigma_sweep (the σ̄ curve) | rate_sweep (the decoder-scale curve) | pixel."},
                        "sigma": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None,
                                  "description": "σ̄ plotted for this variant (null: none)."},
                        "description": {"type": "string", "default": "",
                                        "description": "One line on what the variant is."},
                        "overrides": {**_strip_defaults(stage), "default": {},
                                      "description": "Partial stage config merged over base."},
                    },
                },
            },
            "launcher": {**launcher, "default": {},
                         "description": "Launcher of every stage (simflow.config.LauncherSection)."},
            "stage_launcher": {
                "type": "object", "default": {},
                "propertyNames": {"enum": [s for s in STAGES] + [s.replace("-", "_") for s in STAGES]},
                "additionalProperties": _strip_defaults(launcher),
                "description": "Per-stage launcher overrides, e.g. {train: {nodes: 2}}."},
            "preflight": {
                "type": "object", "default": {}, "additionalProperties": False,
                "description": "The rehearsal of every training run (`snakemake preflight`).",
                "properties": {
                    "steps": {"type": "integer", "minimum": 1, "default": _PREFLIGHT_DEFAULTS["steps"],
                              "description": "Optimisation steps of each rehearsal."},
                    "cpu_overrides": {**_strip_defaults(stage), "default": {},
                                      "description": "Stage-config overrides of a rehearsal that runs "
                                                     "on a CPU (a stated reduced scale)."},
                },
            },
            "tracking": {
                "type": "object", "default": {}, "additionalProperties": False,
                "description": "MLflow: one experiment per study, a parent run, a child per unit.",
                "properties": {
                    "enabled": {"type": "boolean", "default": True, "description": "Log to MLflow."},
                    "tracking_uri": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                                     "description": "null: $MLFLOW_TRACKING_URI, else "
                                                    "sqlite:///<results_root>/mlflow.db."},
                    "experiment": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                                   "description": "Experiment name; null: the study name."},
                },
            },
            "analysis": {
                "type": "object", "default": {}, "additionalProperties": False,
                "description": "Settings of the summary and figures.",
                "properties": {
                    "sweep_reference": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                        "default": _ANALYSIS_DEFAULTS["sweep_reference"],
                                        "description": "Variant added to the σ̄ sweep curve."},
                    "grid_images": {"type": "integer", "minimum": 1,
                                    "default": _ANALYSIS_DEFAULTS["grid_images"],
                                    "description": "Samples per variant in the sample-grid figure."},
                    "claims": {"type": "object", "default": dict(_ANALYSIS_DEFAULTS["claims"]),
                               "description": "Role -> variant name for the claim checks."},
                    "paper_mapping": {"type": "object",
                                      "default": dict(_ANALYSIS_DEFAULTS["paper_mapping"]),
                                      "description": "Variant -> published model shown beside it."},
                },
            },
        },
    }


def keys_markdown(cls: type = Config, prefix: str = "",
                  skip: Sequence[str] = ("study", "variant", "run_dir", "results_root", "tracking",
                                         "launcher", "preflight")) -> str:
    """A Markdown table (key, type, default, description) of ``cls``'s options: by default the
    stage keys a study may set in ``base``/``overrides``; ``keys_markdown(LauncherSection,
    "launcher.", ())`` gives the launcher keys."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, type_name, default, help_text in describe(cls, prefix):
        if key[len(prefix):].split(".")[0] in skip:
            continue
        lines.append(f"| `{key}` | {type_name.replace('|', '/')} | `{json.dumps(default)}` | "
                     f"{help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simflow.study", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate study configs; list their variants and units")
    p.add_argument("configs", nargs="+")
    p = sub.add_parser("init-study", help="create the MLflow store, experiment and parent run")
    p.add_argument("--study", required=True)
    p.add_argument("--results-root", required=True)
    p.add_argument("--out", required=True, help="file receiving the parent run id")
    p.add_argument("--experiment", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--disabled", action="store_true", help="tracking off: write a marker only")
    p.add_argument("--running", action="store_true",
                   help="leave the parent run RUNNING (the workflow ends it when the invocation ends)")
    p = sub.add_parser("run-status", help="set the status of the study's parent run")
    p.add_argument("status", choices=["RUNNING", "FINISHED", "FAILED", "KILLED"])
    p.add_argument("--results-root", required=True)
    p.add_argument("--run-id-file", required=True, help="the parent run id file")
    p.add_argument("--tracking-uri", default=None)
    sub.add_parser("schema", help="print the study config's JSON schema (YAML)")
    p = sub.add_parser("keys", help="print a Markdown table of the stage (or launcher) config keys")
    p.add_argument("--launcher", action="store_true", help="the launcher keys instead")
    args = parser.parse_args(argv)

    if args.command == "check":
        status = 0
        for path in args.configs:
            try:
                study = load_study(path)
            except StudyError as err:
                # a syntax error already starts with the file name (file:line:column: ...)
                print(err if str(err).startswith(str(path)) else f"{path}: {err}", file=sys.stderr)
                status = 2
                continue
            print(f"{path}: study {study.name}: {len(study.variants)} variants x "
                  f"{len(study.seeds)} seed(s); units: {', '.join(study.units)}")
        return status
    if args.command == "init-study":
        run_id = init_study_tracking(args.study, args.results_root, args.out,
                                     experiment=args.experiment, tracking_uri=args.tracking_uri,
                                     enabled=not args.disabled)
        if run_id and args.running:
            set_study_run_status("RUNNING", args.results_root, args.out, tracking_uri=args.tracking_uri)
        print(f"study {args.study}: parent run {run_id or '(tracking disabled)'} -> {args.out}")
        return 0
    if args.command == "run-status":
        run_id = set_study_run_status(args.status, args.results_root, args.run_id_file,
                                      tracking_uri=args.tracking_uri)
        print(f"parent run {run_id}: {args.status}" if run_id else
              f"no MLflow run in {args.run_id_file} (not created yet, or tracking disabled)")
        return 0
    if args.command == "schema":
        sys.stdout.write("# Generated by `python -m simflow.study schema`; do not edit by hand.\n")
        sys.stdout.write(yaml.safe_dump(study_schema(), sort_keys=False, allow_unicode=True))
        return 0
    sys.stdout.write(keys_markdown(LauncherSection, "launcher.", ()) if args.launcher else keys_markdown())
    return 0


if __name__ == "__main__":
    from simflow.fastexit import exit_now

    exit_now(main())  # no interpreter teardown of MLflow (init-study, run-status)
