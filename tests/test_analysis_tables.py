"""Tests of simflow.analysis.tables: the summary rule's per-seed rows, summary.csv (KID columns,
the real-vs-real floor, ``collapsed`` from the alarm's history) and the files of a study folder."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from simflow.analysis.summary import evaluate_claims
from simflow.analysis.tables import FLOOR_COLUMNS, collapse_flag, per_seed_row, variant_summary, write_study_tables

HEALTHY_RATE = {"rate_per_dim": 0.4, "active_fraction": 1.0}


def train_summary(**kw) -> dict:
    return {"steps": 100, "train_time_s": 10.0, "img_per_s": 5.0, "final_loss": 1.0, "rate": HEALTHY_RATE,
            "collapsed": False, "collapse_alarm_step": None, **kw}


def test_collapsed_is_the_alarm_having_fired_at_any_point():
    # The alarm fired at step 400 and the rate recovered by the end: still collapsed.
    assert collapse_flag(train_summary(collapse_alarm_step=400, collapsed=False)) == "true"
    assert collapse_flag(train_summary()) == "false"
    # A final window below the threshold without the alarm (patience not reached) is not a collapse.
    assert collapse_flag(train_summary(collapsed=True)) == "false"
    # An older summary without the alarm's key: the final flag decides.
    old = train_summary(collapsed=True)
    del old["collapse_alarm_step"]
    assert collapse_flag(old) == "true"
    # Pixel space: no latent, no verdict.
    assert collapse_flag({"rate": {}, "collapsed": None, "collapse_alarm_step": None}) == ""


def row(variant: str, seed: int, fid: float, kid: float | None, **train) -> dict:
    return per_seed_row(variant, seed, "latent", 0.5, "fixed σ̄=0.5", "calibrated",
                        fid={"fid": fid, "kid_mean": kid, "kid_std": None if kid is None else kid / 10},
                        reconstruct={"rfid": 1.0, "psnr": 20.0}, nll={"nll_bpd": 2.0},
                        train=train_summary(**train), latent_stats={"total_variation": 0.5},
                        pretrain={"train_time_s": 4.0, "steps": 50} if variant == "frozen_vae" else None)


def test_per_seed_row_reads_kid_and_counts_pretraining():
    r = row("frozen_vae", 0, 12.0, 0.02)
    assert r["kid"] == 0.02 and r["kid_subset_std"] == pytest.approx(0.002) and r["fid"] == 12.0
    assert r["total_updates"] == 150 and r["total_train_time_s"] == 14.0
    assert math.isnan(row("simflow", 0, 12.0, None)["kid"])  # a study run without KID


def test_variant_summary_columns_floor_and_collapse_over_seeds():
    per_seed = pd.DataFrame([row("simflow", 0, 10.0, 0.010), row("simflow", 1, 12.0, 0.014, collapse_alarm_step=300),
                             row("frozen_vae", 0, 20.0, 0.030), row("frozen_vae", 1, 22.0, 0.034)])
    floor = {"fid": 3.5, "kid_mean": 0.0004, "kid_std": 0.0003, "num_images": 500, "split": "test"}
    table = variant_summary(per_seed, floor).set_index("variant")
    assert list(table.columns[:9]) == ["group", "sigma", "posterior", "decoder_scale", "n_seeds", "collapsed",
                                       "kid", "fid", "rfid"]
    assert table.loc["simflow", "kid"] == pytest.approx(0.012) and table.loc["simflow", "kid_std"] > 0
    assert table.loc["simflow", "collapsed"] == "1/2 seeds" and table.loc["frozen_vae", "collapsed"] == "false"
    assert (table["fid_floor"] == 3.5).all() and (table["kid_floor"] == 0.0004).all()
    assert (table["kid_floor_std"] == 0.0003).all() and (table["floor_num_images"] == 500).all()
    assert set(FLOOR_COLUMNS) <= set(table.columns)
    assert "collapse_alarm_step" not in table.columns  # per seed only
    # Every _std column after the means (the order of summary.csv).
    first_std = min(i for i, c in enumerate(table.columns) if c.endswith("_std") and c not in FLOOR_COLUMNS)
    assert all(c.endswith("_std") for c in table.columns[first_std:] if c not in FLOOR_COLUMNS)
    assert variant_summary(per_seed)["fid_floor"].isna().all()  # a study without the floor stage


def test_the_alarms_reason_reaches_the_invalid_claim():
    per_seed = pd.DataFrame([row("simflow", 0, 10.0, 0.01, collapse_alarm_step=300,
                                 collapse_alarm_reason="active dims 0.12 < 0.5"),
                             row("frozen_vae", 0, 20.0, 0.03)])
    assert per_seed.loc[0, "collapse_alarm_reason"] == "active dims 0.12 < 0.5"
    c = evaluate_claims(per_seed)[0]
    assert c["verdict"] == "invalid" and "alarm: active dims 0.12 < 0.5" in c["invalid"]


def test_write_study_tables_writes_every_file(tmp_path):
    rows = [row(v, s, fid + s, (fid + s) / 1000) for v, fid in (("simflow", 10.0), ("frozen_vae", 20.0))
            for s in range(3)]
    out = write_study_tables(tmp_path, pd.DataFrame(rows), [{"variant": "simflow", "seed": 0}],
                             pd.DataFrame(columns=["variant", "seed", "noise_std", "psnr"]),
                             floor={"fid": 3.0, "kid_mean": 0.0, "kid_std": 0.0, "num_images": 10},
                             heading="# Study `t`\n\n")
    for name in ("summary.csv", "summary_per_seed.csv", "latent_stats.csv", "noise_robustness.csv",
                 "claims.json", "summary.md"):
        assert (tmp_path / name).is_file(), name
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims == json.loads(json.dumps(out["claims"]))
    # the same KID gap on every seed: no spread, an exact difference
    assert {c["id"]: c["verdict"] for c in claims}["gfid_vs_frozen_vae"] == "reproduced"
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# Study `t`") and "Real-vs-real floor: 10 real test images" in md
    assert pd.read_csv(tmp_path / "summary.csv")["fid_floor"].tolist() == [3.0, 3.0]
