"""The study config's own keys, typed: what :func:`simflow.study.load_study` validates and what
the generated JSON schema (:func:`simflow.study.schema.study_schema`) describes.

The sections are dataclasses of :func:`simflow.config.option` fields, like the stage config, and
are read with the same :func:`simflow.config.from_dict` (unknown keys, types, ranges). What a
type cannot say is checked in :func:`parse_study` (names, distinct seeds, keys the workflow owns).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from simflow.config import Config, ConfigError, LauncherSection, deep_merge, from_dict, option, to_dict
from simflow.contracts import GROUPS, PARENT_RUN_ID_FILE, SHARED_UNITS, STAGES

__all__ = [
    "AnalysisSection",
    "GROUPS",
    "PreflightSection",
    "Study",
    "StudyError",
    "StudySection",
    "TrackingSection",
    "Variant",
    "VariantSection",
    "get_key",
    "has_key",
    "parse_study",
    "set_key",
    "stage_key",
]

DEFAULT_CLI = "python3 -m simflow"  # python3: plain Debian has no `python`

# Names: a study or variant becomes a folder, a Snakemake wildcard value and an MLflow run name.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED = {"figures", "logs", "preflight"}
# Config keys the workflow sets itself; a study must not set them in base/overrides.
_WORKFLOW_KEYS = ("study", "variant", "run_dir", "results_root", "launcher", "tracking", "preflight",
                  "train.seed", "sample.seed")
_WORKFLOW_KEY_HINTS = {
    "launcher": "use the study-level `launcher:` / `stage_launcher:` sections",
    "tracking": "use the study-level `tracking:` section",
    "preflight": "use the study-level `preflight:` section",
    "train.seed": "use the study-level `seeds:` list",
    "sample.seed": "use the study-level `seeds:` list",
}
# Inputs of the shared stages: identical for every variant, so variants may not override them.
_SHARED_KEYS = ("data", "eval.feature_extractor", "eval.feature_extractor_weights_path",
                "eval.classifier_path", "eval.reference_stats", "eval.num_reference",
                "eval.classifier_steps")
_LAUNCHER_FIELDS = tuple(LauncherSection.__dataclass_fields__)


class StudyError(ConfigError):
    """A study config problem; the message names the study key (and variant) and the fix."""


# ------------------------------------------------------------------------------------------
# the sections
# ------------------------------------------------------------------------------------------
@dataclass
class VariantSection:
    group: Literal[GROUPS] = option(
        "latent", "latent | sigma_sweep (the σ̄ curve) | rate_sweep (the decoder-scale curve) | pixel.")
    sigma: float | None = option(None, "σ̄ plotted for this variant (null: none).", gt=0)
    description: str = option("", "One line on what the variant is.")
    overrides: dict = option({}, "Partial stage config merged over base.")


@dataclass
class PreflightSection:
    steps: int = option(200, "Optimisation steps of each rehearsal.", ge=1)
    cpu_overrides: dict = option({}, "Stage-config overrides of a rehearsal that runs on a CPU "
                                 "(a stated reduced scale).")


@dataclass
class TrackingSection:
    enabled: bool = option(True, "Log to MLflow.")
    tracking_uri: str | None = option(None, "null: $MLFLOW_TRACKING_URI, else "
                                      "sqlite:///<results_root>/mlflow.db.")
    experiment: str | None = option(None, "Experiment name; null: the study name.")


@dataclass
class AnalysisSection:
    sweep_reference: str | None = option("simflow", "Variant added to the σ̄ sweep curve.")
    grid_images: int = option(32, "Samples per variant in the sample-grid figure.", ge=1)
    claims: dict = option({"simflow": "simflow", "frozen_vae": "frozen_vae",
                           "e2e_learnable": "e2e_learnable", "simflow_repa": "simflow_repa",
                           "simflow_equal_updates": "simflow_equal_updates",
                           "simflow_compute_matched": "simflow_compute_matched"},
                          "Role -> variant name for the claim checks.")
    paper_mapping: dict = option({"simflow": "SimFlow", "simflow_repa": "SimFlow + REPA-E",
                                  "frozen_encoder_noise": "STARFlow", "tarflow_pixel": "TarFlow"},
                                 "Variant -> published model shown beside it.")


@dataclass
class StudySection:
    """The top level of a study config (the flat ``launcher_*`` keys aside)."""

    study: str = option("", "Study name: results/<study>/ and the MLflow experiment.")
    results_root: str = option("results", "Root folder of all studies (holds mlflow.db by default).")
    seeds: list[int] = option([0], "Training seeds; every variant runs once per seed.", ge=0, min_len=1)
    cli: str = option(DEFAULT_CLI, "Command that runs the simflow CLI on the submit host.")
    threads: int = option(1, "CPU threads (OMP_NUM_THREADS) of a stage job run in-process.", ge=1)
    stage_server: bool = option(True, "Run the stages that use the local launcher in workers forked "
                                "from one stage server with torch and MLflow loaded "
                                "(simflow.stage_server); false: each stage imports them itself.")
    base: dict = option({}, "Partial stage config shared by every variant (simflow.config; keys "
                        "in config/README.md).")
    pretrain_vae: dict = option({}, "Overrides of base for the shared pretrained VAE of the frozen "
                                "variants (learnable posterior).")
    only_variants: list[str] | None = option(None, "Run only these variants (in the study's order); "
                                             "null: all. Lets an overlay config select a subset.",
                                             min_len=1)
    variants: dict = option({}, "Variant name -> {group, sigma, overrides, description}.")
    launcher: dict = option({}, "Launcher of every stage (simflow.config.LauncherSection).")
    stage_launcher: dict = option({}, "Per-stage launcher overrides, e.g. {train: {nodes: 2}}.")
    preflight: PreflightSection = field(default_factory=PreflightSection, metadata={
        "help": "The rehearsal of every training run (`snakemake preflight`)."})
    tracking: TrackingSection = field(default_factory=TrackingSection, metadata={
        "help": "MLflow: one experiment per study, a parent run, a child per unit."})
    analysis: AnalysisSection = field(default_factory=AnalysisSection, metadata={
        "help": "Settings of the summary and figures."})


STUDY_KEYS = tuple(StudySection.__dataclass_fields__)


# ------------------------------------------------------------------------------------------
# the validated study
# ------------------------------------------------------------------------------------------
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
    """A validated study config (see :mod:`simflow.study` for the keys).

    ``launcher`` is the study-wide launcher section (a partial :class:`LauncherSection` mapping);
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
    cli: str = DEFAULT_CLI
    threads: int = 1
    stage_server: bool = True
    units: dict[str, dict] = field(default_factory=dict)
    preflight: dict = field(default_factory=lambda: to_dict(PreflightSection()))

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
        return SHARED_UNITS["feature-extractor"] in self.units

    @property
    def needs_fid_ref(self) -> bool:
        """True unless ``base.eval.reference_stats`` names precomputed statistics (e.g. ADM's)."""
        return SHARED_UNITS["fid-ref"] in self.units

    @property
    def pretrain_seeds(self) -> list[int]:
        """Seeds whose pretrained VAE some frozen variant uses (empty: no pretrain-vae stage)."""
        return sorted(int(m.group(1)) for u in self.units
                      if (m := re.fullmatch(rf"{SHARED_UNITS['pretrain-vae']}/s(\d+)", u)))


# ------------------------------------------------------------------------------------------
# dotted keys of nested mappings
# ------------------------------------------------------------------------------------------
_MISSING = object()


def get_key(d: Mapping, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``; ``default`` when a level is missing."""
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def has_key(d: Mapping, dotted: str) -> bool:
    """Whether ``dotted`` is set, even to None (get_key alone cannot tell)."""
    return get_key(d, dotted, _MISSING) is not _MISSING


def set_key(d: dict, dotted: str, value: Any) -> None:
    """``d["a"]["b"] = value`` for ``"a.b"``, creating the missing levels."""
    parts = dotted.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def stage_key(name: str) -> str:
    """``fid_ref`` / ``fid-ref`` → ``fid-ref`` (raises for unknown stages)."""
    stage = str(name).replace("_", "-")
    if stage not in STAGES:
        raise StudyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return stage


# ------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------
def _empty_mappings(cls: type, data: Mapping) -> dict:
    """``data`` with the mapping-valued keys left empty in the YAML (``overrides:``, i.e. None)
    as empty mappings, in ``cls`` and its nested sections: ``{}`` for a free mapping, the
    defaults for a section, as a study has always read them."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for name, tp in hints.items():
        if name not in out:
            continue
        if out[name] is None and tp is dict:
            out[name] = {}
        elif out[name] is None and dataclasses.is_dataclass(tp):
            del out[name]
        elif isinstance(out[name], Mapping) and dataclasses.is_dataclass(tp):
            out[name] = _empty_mappings(tp, out[name])
    return out


def _typed(cls: type, data: Any, where: str) -> Any:
    """``from_dict(cls, data, where)`` with its ConfigError as a StudyError."""
    if not isinstance(data, Mapping):
        raise StudyError(f"{where} must be a mapping, got {data!r}")
    try:
        return from_dict(cls, _empty_mappings(cls, copy.deepcopy(dict(data))), where)
    except ConfigError as err:
        raise StudyError(str(err)) from None


def _check_partial(partial: Any, where: str) -> dict:
    """A partial stage config (base, overrides): a mapping of valid stage keys and types, none of
    them a key the workflow sets itself. Returns a copy."""
    if not isinstance(partial, Mapping):
        raise StudyError(f"{where} must be a mapping, got {partial!r}")
    partial = copy.deepcopy(dict(partial))
    for key in _WORKFLOW_KEYS:
        if has_key(partial, key):
            hint = _WORKFLOW_KEY_HINTS.get(key, "the workflow sets it from the study name, variant and seed")
            raise StudyError(f"{where}.{key} must not be set in a study config: {hint}")
    try:
        from_dict(Config, partial)
    except ConfigError as err:
        raise StudyError(f"{where}: {err}") from None
    return partial


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
                out.setdefault(stage_key(prefix), {})[rest[len(prefix) + 1:]] = value
                break
        else:
            raise StudyError(
                f"unknown flat launcher key {key!r}: use launcher_<key> or launcher_<stage>_<key> "
                f"with <key> one of {', '.join(_LAUNCHER_FIELDS)} and <stage> one of "
                f"{', '.join(p for p in stage_prefixes)}")
    return out


def _parse_variant(name: str, spec: Any) -> Variant:
    where = f"variants.{name}"
    if not NAME_RE.fullmatch(name) or name in _RESERVED:
        raise StudyError(f"{where}: a variant name must be letters, digits, '_', '.', '-', start "
                         f"with a letter or digit, and not be one of {sorted(_RESERVED)}")
    section = _typed(VariantSection, spec, where)
    overrides = _check_partial(section.overrides, f"{where}.overrides")
    for key in _SHARED_KEYS:
        if has_key(overrides, key):
            raise StudyError(f"{where}.overrides.{key}: shared by all variants (an input of the "
                             "feature-extractor / fid-ref stages); set it in `base:` instead")
    return Variant(name=name, group=section.group, sigma=section.sigma, overrides=overrides,
                   description=section.description)


def _parse_preflight(section: PreflightSection) -> dict:
    cpu = _check_partial(section.cpu_overrides, "preflight.cpu_overrides")
    for key in ("data.name", "data.root"):
        if has_key(cpu, key):
            raise StudyError(f"preflight.cpu_overrides.{key}: the rehearsal reads (and checks) the "
                             "study's own dataset; it may shrink the model, not change the data")
    return {"steps": section.steps, "cpu_overrides": cpu}


def parse_study(raw: Mapping[str, Any]) -> Study:
    """The study config ``raw`` checked key by key (units not built yet: see
    :func:`simflow.study.load_study`). Errors are :class:`StudyError` naming the key."""
    if not isinstance(raw, Mapping):
        raise StudyError("a study config must be a mapping at the top level")
    unknown = [k for k in raw if k not in STUDY_KEYS and not str(k).startswith("launcher_")]
    if unknown:
        raise StudyError(f"unknown study key {unknown[0]!r}; valid keys: {', '.join(STUDY_KEYS)} "
                         "(and flat launcher_<key> / launcher_<stage>_<key> overrides)")
    top = {k: v for k, v in raw.items() if not str(k).startswith("launcher_")}
    # An overlay's partial analysis section refines the defaults (claims merge role by role).
    if isinstance(raw.get("analysis"), Mapping):
        top["analysis"] = deep_merge(to_dict(AnalysisSection()), dict(raw["analysis"]))
    spec: StudySection = _typed(StudySection, top, "")

    if not NAME_RE.fullmatch(spec.study):
        raise StudyError(f"study: expected a name of letters, digits, '_', '.', '-', got {raw.get('study')!r}")
    if not spec.results_root.strip():
        raise StudyError(f"results_root: expected a folder path, got {spec.results_root!r}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise StudyError(f"seeds: expected a non-empty list of distinct integers >= 0, got {spec.seeds!r}")
    if not spec.cli.strip():
        raise StudyError(f"cli: expected the command that runs the simflow CLI, got {spec.cli!r}")
    base = _check_partial(spec.base, "base")
    pretrain = _check_partial(spec.pretrain_vae, "pretrain_vae")
    if not spec.variants:
        raise StudyError("variants: expected a non-empty mapping of variant name -> "
                         "{group, sigma, overrides}")
    variants = {str(name): _parse_variant(str(name), v) for name, v in spec.variants.items()}
    # An overlay cannot remove variants (Snakemake merges config files key by key): it names the
    # ones to run instead.
    if spec.only_variants is not None:
        missing = [v for v in spec.only_variants if v not in variants]
        if missing:
            raise StudyError(f"only_variants: {missing[0]!r} is not a variant of the study; variants: "
                             f"{', '.join(variants)}")
        variants = {v: variants[v] for v in variants if v in spec.only_variants}
    stage_launcher: dict[str, dict] = {}
    for key, section in spec.stage_launcher.items():
        if section is not None and not isinstance(section, Mapping):
            raise StudyError(f"stage_launcher.{key} must be a mapping, got {section!r}")
        stage_launcher[stage_key(key)] = copy.deepcopy(dict(section or {}))
    return Study(name=spec.study, results_root=spec.results_root.rstrip("/") or "/",
                 seeds=list(spec.seeds), base=base, pretrain_vae=pretrain, variants=variants,
                 launcher=copy.deepcopy(spec.launcher), stage_launcher=stage_launcher,
                 flat_launcher=_split_flat_launcher(raw), tracking=to_dict(spec.tracking),
                 analysis=to_dict(spec.analysis), cli=spec.cli.strip(), threads=spec.threads,
                 stage_server=spec.stage_server,
                 preflight=_parse_preflight(spec.preflight))
