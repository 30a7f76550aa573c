"""The units of a study and their explicit stage configs.

Every unit of work has its own folder ``<results_root>/<study>/<unit>/``:

* ``<variant>/s<seed>``: one variant trained with one seed;
* ``_shared/feature_extractor``: the demo's classifier (FID feature proxy, REPA target);
* ``_shared/fid_ref``: the FID reference statistics;
* ``_shared/fid_floor``: the real-vs-real FID/KID floor (real test images against the reference);
* ``_shared/pretrain_vae/s<seed>``: the pretrained VAE used by the frozen variants.

A unit's config is explicit (only the keys the study sets, plus the workflow's own: identity,
seeds, tracking, the paths of the shared outputs) and validated as a whole stage config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from simflow.config import Config, ConfigError, deep_merge, from_dict, validate
from simflow.contracts import FROZEN_MODES, RUN_ID_FILE, SHARED_DIR, SHARED_UNITS, STAGE_FILES
from simflow.study.spec import Study, StudyError, get_key, has_key, set_key

__all__ = [
    "build_units",
    "pretrain_unit",
    "pretrained_vae_path",
    "resolved_config",
    "shared_config",
    "pipeline_configs",
    "unit_run_name",
    "unit_tags",
    "variant_config",
    "variant_unit",
]

# VAE keys that fix the architecture of a frozen variant's VAE: they must match the pretrained one.
_VAE_ARCH_KEYS = ("latent_channels", "base_channels", "channel_mult", "num_res_blocks",
                  "attn_resolutions", "posterior")


def variant_unit(variant: str, seed: int) -> str:
    return f"{variant}/s{seed}"


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
        "classifier": f"{study.unit_dir(SHARED_UNITS['feature-extractor'])}/"
                      f"{STAGE_FILES['feature-extractor']['classifier']}",
        "reference_stats": f"{study.unit_dir(SHARED_UNITS['fid-ref'])}/{STAGE_FILES['fid-ref']['stats']}",
    }


def pretrain_unit(seed: int) -> str:
    return f"{SHARED_UNITS['pretrain-vae']}/s{seed}"


def pretrained_vae_path(study: Study, seed: int) -> str:
    """The VAE checkpoint that the pretrain-vae stage of ``seed`` writes."""
    return f"{study.unit_dir(pretrain_unit(seed))}/{STAGE_FILES['pretrain-vae']['vae']}"


def _link_shared(study: Study, cfg: dict, seed: int | None) -> dict:
    """Point the eval/model paths that nobody set explicitly at the shared stage outputs."""
    paths = _shared_paths(study)
    defaults = Config()
    fe = get_key(cfg, "eval.feature_extractor") or defaults.eval.feature_extractor
    if fe == "simflow-classifier" and get_key(cfg, "eval.classifier_path") is None:
        set_key(cfg, "eval.classifier_path", paths["classifier"])
    if get_key(cfg, "eval.reference_stats") is None:
        set_key(cfg, "eval.reference_stats", paths["reference_stats"])
    model = cfg.get("model", {})
    if (float(model.get("repa_weight", 0.0) or 0.0) > 0
            and model.get("repa_target", defaults.model.repa_target) == "classifier"
            and model.get("repa_target_weights_path") is None):
        set_key(cfg, "model.repa_target_weights_path", paths["classifier"])
    if seed is not None and model.get("mode") in FROZEN_MODES and model.get("pretrained_vae") is None:
        set_key(cfg, "model.pretrained_vae", pretrained_vae_path(study, seed))
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
    set_key(cfg, "train.seed", seed)
    set_key(cfg, "sample.seed", seed)
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
        if has_key(base, "eval.classifier_steps"):
            set_key(cfg, "eval.classifier_steps", get_key(base, "eval.classifier_steps"))
        set_key(cfg, "train.seed", 0)
        unit = SHARED_UNITS["feature-extractor"]
    elif kind == "fid_ref":
        cfg = {"data": copy.deepcopy(base.get("data", {}))}
        for key in ("feature_extractor", "feature_extractor_weights_path", "classifier_path",
                    "num_reference"):
            if has_key(base, f"eval.{key}"):
                set_key(cfg, f"eval.{key}", get_key(base, f"eval.{key}"))
        set_key(cfg, "train.seed", 0)
        _link_shared(study, cfg, None)
        cfg["eval"].pop("reference_stats", None)  # fid-ref writes it; it does not read it
        unit = SHARED_UNITS["fid-ref"]
    elif kind == "fid_floor":
        # As many real test images as a variant generates (the study's base sample.num_samples).
        cfg = {"data": copy.deepcopy(base.get("data", {}))}
        for key in ("eval.feature_extractor", "eval.feature_extractor_weights_path", "eval.classifier_path",
                    "eval.kid", "eval.reference_stats", "sample.num_samples"):
            if has_key(base, key):
                set_key(cfg, key, get_key(base, key))
        set_key(cfg, "train.seed", 0)
        _link_shared(study, cfg, None)
        unit = SHARED_UNITS["fid-floor"]
    elif kind == "pretrain_vae":
        if seed is None:
            raise StudyError("shared_config('pretrain_vae') needs a seed")
        cfg = deep_merge(copy.deepcopy(base), copy.deepcopy(study.pretrain_vae))
        set_key(cfg, "train.seed", seed)
        set_key(cfg, "sample.seed", seed)
        unit = pretrain_unit(seed)
    else:
        raise StudyError(f"unknown shared unit {kind!r}: feature_extractor, fid_ref, fid_floor or pretrain_vae")
    _identity(study, cfg, kind, unit)
    return _validated(cfg, f"shared unit {unit}")


def build_units(study: Study) -> dict[str, dict]:
    """Every unit of ``study`` → its explicit stage config: each variant and seed, and a shared
    unit wherever some unit reads its output (the frozen VAE architectures checked)."""
    units: dict[str, dict] = {}
    for variant in study.variants:
        for seed in study.seeds:
            units[variant_unit(variant, seed)] = variant_config(study, variant, seed)
    for seed in study.seeds:
        wanted = pretrained_vae_path(study, seed)
        if any(get_key(cfg, "model.mode") in FROZEN_MODES and get_key(cfg, "model.pretrained_vae") == wanted
               for cfg in units.values()):
            units[pretrain_unit(seed)] = shared_config(study, "pretrain_vae", seed)
    if get_key(study.base, "eval.reference_stats") is None:
        units[SHARED_UNITS["fid-ref"]] = shared_config(study, "fid_ref")
    units[SHARED_UNITS["fid-floor"]] = shared_config(study, "fid_floor")
    classifier = _shared_paths(study)["classifier"]
    if any(classifier in (get_key(cfg, "eval.classifier_path"), get_key(cfg, "model.repa_target_weights_path"))
           for cfg in units.values()):
        units[SHARED_UNITS["feature-extractor"]] = shared_config(study, "feature_extractor")
    _check_frozen_vae(study, units)
    return units


def _check_frozen_vae(study: Study, units: dict[str, dict]) -> None:
    """A frozen variant builds its VAE from its own ``vae`` section and loads the pretrained
    weights into it: the architecture keys must agree."""
    for unit, cfg in units.items():
        if get_key(cfg, "model.mode") not in FROZEN_MODES:
            continue
        seed = get_key(cfg, "train.seed")
        pre_unit = pretrain_unit(seed)
        if pre_unit not in units or get_key(cfg, "model.pretrained_vae") != pretrained_vae_path(study, seed):
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


def unit_run_name(unit: str) -> str:
    """MLflow run name of a unit: ``<variant>_s<seed>``, or ``shared:<stage>`` for a shared unit.

    The seed is always in the name (not only when a study has several seeds), so that adding
    seeds renames nothing. The set-up rule derives it from the unit, not from a tracked
    parameter: renaming runs never re-runs a unit."""
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


def resolved_config(cfg: Mapping[str, Any]) -> Config:
    """The full :class:`Config` of an explicit unit config (defaults filled in)."""
    return from_dict(Config, copy.deepcopy(dict(cfg)))


def pipeline_configs(study: Study, variant: str, seed: int | None = None) -> tuple[Config, Config | None]:
    """The resolved configs of ``variant``'s training pipeline (seed ``seed``, default the first):
    its own, and that of the VAE pre-training it consumes (None for modes without one)."""
    seed = study.seeds[0] if seed is None else seed
    cfg = resolved_config(variant_config(study, variant, seed))
    pretrain = (resolved_config(shared_config(study, "pretrain_vae", seed))
                if cfg.model.mode in FROZEN_MODES else None)
    return cfg, pretrain
