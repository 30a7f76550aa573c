"""The study's tables from its stages' outputs: what the summary rule writes.

* :func:`per_seed_row`: one ``(variant, seed)``'s row of ``summary_per_seed.csv``, from its
  stages' JSON outputs (fid, reconstruct, nll, train and, for a frozen variant, its VAE's
  pre-training summary) and its latent statistics;
* :func:`variant_summary`: ``summary.csv``, one row per variant (the seed mean under the
  metric's own name, ``<metric>_std`` over seeds beside it), with the real-vs-real floor;
* :func:`write_study_tables`: every table, ``claims.json`` and ``summary.md`` of a study folder.

``workflow/scripts/summary.py`` (rule summary) and the tests' fake studies both call these, so the
tables the tests read are the ones a study writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from simflow.analysis.summary import aggregate_seeds, evaluate_claims, results_markdown

__all__ = [
    "FLOOR_COLUMNS",
    "SUMMARY_FRONT",
    "collapse_flag",
    "number",
    "per_seed_row",
    "variant_summary",
    "write_study_tables",
]

#: The first columns of summary.csv, in order (when present).
SUMMARY_FRONT = ("variant", "group", "sigma", "posterior", "decoder_scale", "n_seeds", "collapsed", "kid",
                 "fid", "rfid", "rate_per_dim", "nll_bpd")
#: summary.csv's real-vs-real floor (the fid-floor stage: real test images against the reference,
#: as many as the generated samples): the same value on every row, NaN when the study has none.
FLOOR_COLUMNS = {"fid_floor": "fid", "kid_floor": "kid_mean", "kid_floor_std": "kid_std",
                 "floor_num_images": "num_images"}


def number(value: Any) -> float:
    """A finite float, or NaN for null/missing (pixel variants have no rFID/latents)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def collapse_flag(train: Mapping[str, Any]) -> str:
    """"true" / "false" / "" (no latent) of one run's ``train_summary.json``: whether the collapse
    alarm fired at any point of training (``collapse_alarm_step`` set), so that an encoder that
    collapsed and recovered late is still marked. A summary written before the alarm's step was
    recorded falls back to its final ``collapsed`` flag (the last rate window)."""
    if train.get("collapsed") is None and "rate_per_dim" not in (train.get("rate") or {}):
        return ""  # no latent to monitor (pixel space: its last window has the NLL, not a rate)
    if "collapse_alarm_step" in train:
        return "true" if train["collapse_alarm_step"] is not None else "false"
    return "" if train.get("collapsed") is None else str(bool(train["collapsed"])).lower()


def per_seed_row(variant: str, seed: int, group: str, sigma: Any, posterior: str, decoder_scale: Any, *,
                 fid: Mapping[str, Any], reconstruct: Mapping[str, Any], nll: Mapping[str, Any],
                 train: Mapping[str, Any], latent_stats: Mapping[str, float],
                 pretrain: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary_per_seed.csv row of one trained unit. ``kid`` / ``kid_subset_std`` are the
    fid stage's KID mean and its spread over subsets; a frozen variant's compute (updates, wall
    clock, counted FLOPs) includes its VAE's pre-training (``pretrain``)."""
    offset = number(pretrain["train_time_s"]) if pretrain is not None else 0.0
    pretrain_steps = number(pretrain["steps"]) if pretrain is not None else 0.0
    rate = train.get("rate") or {}
    return {
        "variant": variant, "seed": seed, "group": group, "sigma": number(sigma),
        "posterior": posterior, "decoder_scale": str(decoder_scale),
        "kid": number(fid.get("kid_mean")), "kid_subset_std": number(fid.get("kid_std")),
        "fid": number(fid.get("fid")), "isc": number(fid.get("isc_mean")),
        "rfid": number(reconstruct.get("rfid")), "psnr": number(reconstruct.get("psnr")),
        "nll_bpd": number(nll.get("nll_bpd")), "nll_protocol": str(nll.get("protocol", "")),
        "bayes_accuracy": number(nll.get("bayes_accuracy")),
        "rate_per_dim": number(rate.get("rate_per_dim")),
        "rate_bits_per_image": number(rate.get("rate_bits_per_image")),
        "mu_spread_rel": number(rate.get("mu_spread_rel")),
        "active_fraction": number(rate.get("active_fraction")),
        "posterior_std": number(rate.get("posterior_std")),
        "nll_weight": number(rate.get("nll_weight")),
        "collapsed": collapse_flag(train),
        "collapse_alarm_step": number(train.get("collapse_alarm_step")),
        "collapse_alarm_reason": str(train.get("collapse_alarm_reason") or ""),
        **latent_stats,
        "train_time_s": number(train.get("train_time_s")), "img_per_s": number(train.get("img_per_s")),
        "total_train_time_s": number(train.get("train_time_s")) + offset,
        "steps": number(train.get("steps")), "final_loss": number(train.get("final_loss")),
        "total_updates": number(train.get("steps")) + pretrain_steps,
        # counted training FLOPs (simflow.flops), the VAE pre-training's included
        "total_train_pflops": (number(train.get("train_flops"))
                               + (number(pretrain.get("train_flops")) if pretrain is not None else 0.0)) / 1e15,
    }


def _collapse_label(flags: pd.Series) -> str:
    """One variant's collapse verdict over its seeds: "true", "false", "k/n seeds" or "" (no latent)."""
    known = [str(f).lower() for f in flags if str(f).lower() in ("true", "false")]
    if not known:
        return ""
    k = known.count("true")
    return "true" if k == len(known) else "false" if k == 0 else f"{k}/{len(known)} seeds"


def variant_summary(per_seed: pd.DataFrame, floor: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """summary.csv: one row per variant (study order) with the seed mean of every numeric column
    under its own name and its std over seeds as ``<column>_std`` (after the others), ``n_seeds``,
    ``collapsed`` over the seeds (``true`` / ``false`` / ``k/n seeds``) and the real-vs-real
    floor's :data:`FLOOR_COLUMNS` (from the fid-floor stage's JSON ``floor``; NaN without one)."""
    per_seed = per_seed.copy()
    if "collapsed" in per_seed.columns:
        per_seed["collapsed"] = per_seed["collapsed"].fillna("").astype(str).str.lower()
    agg = aggregate_seeds(per_seed.drop(columns=["seed"], errors="ignore"), by="variant")
    agg = agg.rename(columns={c: c[: -len("_mean")] for c in agg.columns if c.endswith("_mean")})
    # sigma is a setting (no spread); the alarm's step is per seed (summary_per_seed.csv), its
    # mean over seeds means nothing: the collapsed column says how many seeds it fired on.
    agg = agg.drop(columns=["sigma_std", "collapse_alarm_step", "collapse_alarm_step_std"], errors="ignore")
    if "collapsed" in per_seed.columns:
        labels = per_seed.groupby("variant", sort=False)["collapsed"].agg(_collapse_label)
        agg["collapsed"] = agg["variant"].map(labels)
    for column, key in FLOOR_COLUMNS.items():
        agg[column] = number((floor or {}).get(key))
    rest = [c for c in agg.columns if c not in SUMMARY_FRONT]
    return agg[[c for c in SUMMARY_FRONT if c in agg.columns] + [c for c in rest if not c.endswith("_std")]
               + [c for c in rest if c.endswith("_std")]]


def write_study_tables(study_dir: str | Path, per_seed: pd.DataFrame, latent_rows: Sequence[Mapping[str, Any]],
                       noise: pd.DataFrame, *, claim_names: Mapping[str, str] | None = None,
                       paper_mapping: Mapping[str, str] | None = None,
                       floor: Mapping[str, Any] | None = None, heading: str = "") -> dict[str, Any]:
    """Write summary_per_seed.csv, summary.csv (:func:`variant_summary`), latent_stats.csv,
    noise_robustness.csv, claims.json (:func:`~simflow.analysis.summary.evaluate_claims` with the
    study's ``claim_names``) and summary.md (``heading`` + the results and claims) into
    ``study_dir``; returns ``{"summary": DataFrame, "claims": list}``."""
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(study_dir / "summary_per_seed.csv", index=False)
    summary = variant_summary(per_seed, floor)
    summary.to_csv(study_dir / "summary.csv", index=False)
    pd.DataFrame(list(latent_rows)).to_csv(study_dir / "latent_stats.csv", index=False)
    noise.to_csv(study_dir / "noise_robustness.csv", index=False)
    claims = evaluate_claims(per_seed, noise if len(noise) else None, **dict(claim_names or {}))
    (study_dir / "claims.json").write_text(json.dumps(claims, indent=2, allow_nan=False))
    (study_dir / "summary.md").write_text(heading + results_markdown(per_seed, claims, mapping=paper_mapping,
                                                                     floor=floor))
    return {"summary": summary, "claims": claims}
