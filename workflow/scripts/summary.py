"""Snakemake script of rule summary: per-(variant, seed) metrics -> the study's tables.

Reads each unit's stage outputs and writes, through simflow.analysis.tables.write_study_tables:
latent_stats.csv (the four smoothness statistics of each unit's posterior means),
summary_per_seed.csv (one row per variant and seed), summary.csv (one row per variant: the mean
over seeds under the metric's name, ``<metric>_std`` beside it, the real-vs-real floor),
noise_robustness.csv (PSNR under latent noise, Figure 3a), claims.json and summary.md; and
fid_curves.csv (the gFID probes during training, Figure 2).
"""

import contextlib
import json
import math

import numpy as np
import pandas as pd

from simflow.analysis import latent_statistics
from simflow.analysis.load import NOISE_COLUMNS
from simflow.analysis.latent_stats import LATENT_STAT_COLUMNS
from simflow.analysis.tables import number, per_seed_row, write_study_tables


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
        pre = pretrain[pretrain_path] if pretrain_path is not None else None
        # A frozen variant's compute includes its VAE's pre-training: its wall-clock counts too.
        offset = number(pre["train_time_s"]) if pre is not None else 0.0
        for point in train.get("fid_curve") or []:
            curve_rows.append({"variant": variant, "seed": seed, "group": group, "step": point["step"],
                               "train_time_s": number(point["train_time_s"]),
                               "total_time_s": number(point["train_time_s"]) + offset,
                               "fid": number(point["fid"])})
        rows.append(per_seed_row(variant, seed, group, sigma, posterior, decoder_scale, fid=fid, reconstruct=rec,
                                 nll=nll, train=train, latent_stats=stats, pretrain=pre))

    per_seed = pd.DataFrame(rows)
    pd.DataFrame(curve_rows, columns=["variant", "seed", "group", "step", "train_time_s", "total_time_s",
                                      "fid"]).to_csv(sm.output.fid_curves, index=False)
    analysis = sm.params.analysis
    study = sm.config["study"]
    heading = (f"# Study `{study}`\n\n{per_seed['variant'].nunique()} variants x {per_seed['seed'].nunique()} "
               "seed(s); tables: summary.csv, summary_per_seed.csv, latent_stats.csv, noise_robustness.csv.\n\n")
    out = write_study_tables(sm.output.summary.rsplit("/", 1)[0], per_seed, latent_rows,
                             pd.DataFrame(noise_rows, columns=NOISE_COLUMNS),
                             claim_names=analysis["claims"], paper_mapping=analysis["paper_mapping"],
                             floor=read_json(sm.input.floor), heading=heading)
    print(out["summary"].to_string())


sm = snakemake  # noqa: F821 (injected by Snakemake)
with open(sm.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    main(sm)
