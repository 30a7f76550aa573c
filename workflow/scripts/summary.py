"""Snakemake script of rule summary: per-(variant, seed) metrics -> the study's tables.

Writes latent_stats.csv (the four smoothness statistics of each unit's posterior means),
summary_per_seed.csv (one row per variant and seed), summary.csv (one row per variant: the mean
over seeds under the metric's name, ``<metric>_std`` beside it), noise_robustness.csv (PSNR
under latent noise, Figure 3a), fid_curves.csv (the gFID probes during training, Figure 2),
claims.json and summary.md (simflow.analysis).
"""

import contextlib
import json
import math

import numpy as np
import pandas as pd

from simflow.analysis import (
    aggregate_seeds,
    evaluate_claims,
    latent_statistics,
    results_markdown,
)
from simflow.analysis.summary import LATENT_STAT_COLUMNS


def number(value):
    """A finite float, or NaN for null/missing (pixel variants have no rFID/latents)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def collapse_label(flags):
    """One variant's collapse verdict over its seeds: "true", "false", "k/n seeds" or "" (no latent)."""
    known = [f for f in flags if f in ("true", "false")]
    if not known:
        return ""
    k = known.count("true")
    return "true" if k == len(known) else "false" if k == 0 else f"{k}/{len(known)} seeds"


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def main(sm) -> None:
    rows, latent_rows, noise_rows, curve_rows = [], [], [], []
    pretrain = {path: read_json(path) for path in sm.input.pretrain}
    for i, (variant, seed, group, sigma, posterior, decoder_scale, pretrain_path) in enumerate(sm.params.units):
        fid, rec, nll, train = (read_json(sm.input[k][i]) for k in ("fid", "reconstruct", "nll", "train"))
        with np.load(sm.input.latents[i]) as npz:
            if "not_applicable" in npz.files and bool(npz["not_applicable"]):
                stats = {k: math.nan for k in LATENT_STAT_COLUMNS}
            else:
                stats = latent_statistics(npz["mu"])
        latent_rows.append({"variant": variant, "seed": seed, **stats})
        latent_std = number(rec.get("latent_std"))
        for point in rec.get("noise_sweep") or []:
            noise_rows.append({"variant": variant, "seed": seed, "posterior": posterior,
                               "noise_std": number(point.get("noise_std")),
                               "noise_rel": number(point.get("noise_rel")), "latent_std": latent_std,
                               "psnr": number(point.get("psnr")), "mse": number(point.get("mse"))})
        # A frozen variant's compute includes its VAE's pre-training: its wall-clock counts too.
        offset = number(pretrain[pretrain_path]["train_time_s"]) if pretrain_path is not None else 0.0
        pretrain_steps = number(pretrain[pretrain_path]["steps"]) if pretrain_path is not None else 0.0
        for point in train.get("fid_curve") or []:
            curve_rows.append({"variant": variant, "seed": seed, "group": group, "step": point["step"],
                               "train_time_s": number(point["train_time_s"]),
                               "total_time_s": number(point["train_time_s"]) + offset,
                               "fid": number(point["fid"])})
        rate = train.get("rate") or {}
        collapsed = train.get("collapsed")
        rows.append({
            "variant": variant, "seed": seed, "group": group, "sigma": number(sigma),
            "posterior": posterior, "decoder_scale": str(decoder_scale),
            "fid": number(fid.get("fid")), "isc": number(fid.get("isc_mean")),
            "rfid": number(rec.get("rfid")), "psnr": number(rec.get("psnr")),
            "nll_bpd": number(nll.get("nll_bpd")), "nll_protocol": nll.get("protocol", ""),
            "bayes_accuracy": number(nll.get("bayes_accuracy")),
            "rate_per_dim": number(rate.get("rate_per_dim")),
            "rate_bits_per_image": number(rate.get("rate_bits_per_image")),
            "mu_spread_rel": number(rate.get("mu_spread_rel")),
            "active_fraction": number(rate.get("active_fraction")),
            "posterior_std": number(rate.get("posterior_std")),
            "nll_weight": number(rate.get("nll_weight")),
            "collapsed": "" if collapsed is None else str(bool(collapsed)).lower(),
            **stats,
            "train_time_s": number(train.get("train_time_s")), "img_per_s": number(train.get("img_per_s")),
            "total_train_time_s": number(train.get("train_time_s")) + offset,
            "steps": number(train.get("steps")), "final_loss": number(train.get("final_loss")),
            "total_updates": number(train.get("steps")) + pretrain_steps,
        })

    per_seed = pd.DataFrame(rows)
    per_seed.to_csv(sm.output.per_seed, index=False)
    pd.DataFrame(latent_rows).to_csv(sm.output.latent_stats, index=False)
    noise = pd.DataFrame(noise_rows, columns=["variant", "seed", "posterior", "noise_std", "noise_rel",
                                              "latent_std", "psnr", "mse"])
    noise.to_csv(sm.output.noise, index=False)
    pd.DataFrame(curve_rows, columns=["variant", "seed", "group", "step", "train_time_s", "total_time_s",
                                      "fid"]).to_csv(sm.output.fid_curves, index=False)

    # One row per variant: the seed mean under the metric's own name, the spread as <metric>_std.
    agg = aggregate_seeds(per_seed.drop(columns=["seed"]), by="variant")
    agg = agg.rename(columns={c: c[: -len("_mean")] for c in agg.columns if c.endswith("_mean")})
    agg = agg.drop(columns=["sigma_std"], errors="ignore")
    agg["collapsed"] = agg["variant"].map(per_seed.groupby("variant", sort=False)["collapsed"].agg(collapse_label))
    front = ["variant", "group", "sigma", "posterior", "decoder_scale", "n_seeds", "collapsed", "fid",
             "rfid", "rate_per_dim", "nll_bpd"]
    rest = [c for c in agg.columns if c not in front]
    agg = agg[[c for c in front if c in agg.columns] + [c for c in rest if not c.endswith("_std")]
              + [c for c in rest if c.endswith("_std")]]
    agg.to_csv(sm.output.summary, index=False)

    analysis = sm.params.analysis
    claims = evaluate_claims(per_seed, noise if len(noise) else None, **analysis["claims"])
    with open(sm.output.claims, "w") as fh:
        json.dump(claims, fh, indent=2)
    study = sm.config["study"]
    with open(sm.output.markdown, "w") as fh:
        fh.write(f"# Study `{study}`\n\n{len(agg)} variants x {per_seed['seed'].nunique()} seed(s); "
                 "tables: summary.csv, summary_per_seed.csv, latent_stats.csv, noise_robustness.csv.\n\n")
        fh.write(results_markdown(per_seed, claims, mapping=analysis["paper_mapping"]))
    print(agg.to_string())


sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    main(sm)
