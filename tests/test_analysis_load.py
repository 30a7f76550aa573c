"""Tests of simflow.analysis.load (the notebooks' loading and table helpers) and
simflow.analysis.report (the report's summary page and the parent run's outputs), on a small
fake results tree with the workflow's layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_study import write_summary_tables

from simflow.analysis import latent_statistics, load, report
from simflow.analysis.summary import VERDICTS

STUDY = "fake"
# variant: (group, sigma, posterior, gFID of seed 0, latent?)
VARIANTS = {
    "simflow": ("latent", 0.5, "fixed σ̄=0.5", 20.0, True),
    "frozen_vae": ("latent", None, "learnable", 30.0, True),
    "tarflow_pixel": ("pixel", None, "none", 50.0, False),
}
SEEDS = (0, 1)
FLOOR = {"fid": 4.5, "kid_mean": 0.0003, "kid_std": 0.0002, "num_images": 12, "split": "test"}


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_results(root: Path, per_seed_table: bool = True, noise_csv: bool = True) -> Path:
    study_dir = root / STUDY
    rng = np.random.default_rng(0)
    rows, noise_rows, latent_rows = [], [], []
    for variant, (group, sigma, posterior, fid, latent) in VARIANTS.items():
        for seed in SEEDS:
            unit = study_dir / variant / f"s{seed}"
            sweep = [{"noise_std": s, "psnr": 30.0 - (2 if sigma else 10) * s, "mse": s}
                     for s in (0.0, 1.0)] if latent else []
            _json(unit / "metrics" / "reconstruct.json", {"noise_sweep": sweep, "posterior": posterior})
            np.savez(unit / "samples.npz", arr_0=rng.integers(0, 255, (12, 8, 8, 1), dtype=np.uint8))
            if latent:
                z = rng.standard_normal((16, 3, 4, 4)).astype(np.float32)
                z[:, 2] = 0.0  # a dead channel
                np.savez(unit / "latents.npz", mu=z, z=z + 0.5)
                np.savez(unit / "interpolation.npz", arr_0=rng.integers(0, 255, (8, 8, 8, 1), dtype=np.uint8))
                stats = latent_statistics(z[:, :2])
            else:
                np.savez(unit / "latents.npz", not_applicable=True)
                np.savez(unit / "interpolation.npz", arr_0=np.zeros((0, 1, 1, 1), np.uint8))
                stats = {k: math.nan for k in load.LATENT_STAT_COLUMNS}
            latent_rows.append({"variant": variant, "seed": seed, **stats})
            noise_rows += [{"variant": variant, "seed": seed, "posterior": posterior, **p} for p in sweep]
            rows.append({"variant": variant, "seed": seed, "group": group,
                         "sigma": math.nan if sigma is None else sigma, "posterior": posterior,
                         "kid": (fid + seed) / 1000, "fid": fid + seed, "rfid": 5.0 + seed if latent else math.nan,
                         "nll_bpd": 1.5, **stats, "train_time_s": 60.0, "img_per_s": 100.0})
    write_summary_tables(study_dir, rows, latent_rows, noise_rows, heading=f"# Study `{STUDY}`\n\n",
                         per_seed_table=per_seed_table, noise_csv=noise_csv, floor=FLOOR)
    return root


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return make_results(tmp_path_factory.mktemp("results"))


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def test_open_results_loads_the_tables_and_the_unit_folders(results):
    res = load.open_results(results, STUDY, {"claims": {"e2e": "simflow"}})
    assert res.variants == list(VARIANTS)
    assert list(res.units) == [(v, s) for v in VARIANTS for s in SEEDS]
    assert res.units[("simflow", 1)] == results / STUDY / "simflow" / "s1"
    assert res.first_seed == dict.fromkeys(VARIANTS, 0)
    assert res.first_unit("frozen_vae") == results / STUDY / "frozen_vae" / "s0"
    assert set(res.noise["variant"]) == {"simflow", "frozen_vae"}
    assert res.claim_names == {"e2e": "simflow"}
    assert "3 variants, 6 runs" in res.describe()


def test_a_missing_study_names_the_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="snakemake -c2 --configfile config/demo.yaml"):
        load.open_results(tmp_path, "nothing-here")


def test_older_results_trees_fall_back_to_the_files_they_have(tmp_path):
    root = make_results(tmp_path, per_seed_table=False, noise_csv=False)
    res = load.open_results(root, STUDY)
    assert len(res.per_seed) == len(VARIANTS) and "seed" not in res.per_seed  # summary.csv
    assert sorted(res.units) == sorted((v, s) for v in VARIANTS for s in SEEDS)  # from the s* folders
    # noise from each unit's reconstruct.json: the same numbers as the table would hold
    assert list(res.noise.columns) == load.NOISE_COLUMNS
    assert len(res.noise) == 2 * 2 * len(SEEDS)
    assert load.read_table(root / STUDY, "absent.csv") is None


def test_load_npz_skips_not_applicable_and_missing_files(results):
    unit = results / STUDY / "tarflow_pixel" / "s0"
    assert load.load_npz(unit / "latents.npz", ["mu"]) is None
    assert load.load_npz(unit / "nothing.npz", ["mu"]) is None
    arrays = load.load_npz(results / STUDY / "simflow" / "s0" / "latents.npz", ["mu", "absent"])
    assert list(arrays) == ["mu"] and arrays["mu"].shape == (16, 3, 4, 4)


def test_summary_table_is_sorted_by_gfid_with_mean_and_spread(results):
    res = load.open_results(results, STUDY)
    table = load.summary_table(res.per_seed)
    assert list(table.index) == ["simflow", "frozen_vae", "tarflow_pixel"]
    assert table.loc["simflow", "fid"] == "20.5 ± 0.71"
    assert table.loc["simflow", "sigma"] == "0.5"  # a setting: no spread
    assert table.loc["tarflow_pixel", "rfid"] == "–"
    assert list(table["n_seeds"]) == [2, 2, 2]
    assert load.mean_std(3.0, 0.5, 1) == "3" and load.mean_std(float("nan"), 1.0, 2) == "–"
    assert list(dict.fromkeys(load.order_by_gfid(res.per_seed)["variant"])) == list(table.index)


def test_noise_drop_table_and_latent_scale(results):
    res = load.open_results(results, STUDY)
    drop = load.noise_drop_table(res.noise, res)
    assert list(drop.index) == ["simflow", "frozen_vae"]  # smallest drop first
    assert drop.loc["simflow", "drop (dB)"] == pytest.approx(2.0)
    assert drop.loc["frozen_vae", "PSNR @ 1"] == pytest.approx(20.0)
    assert drop.loc["simflow", "z_std"] > 0 and {"mu_std", "posterior"} <= set(drop.columns)
    assert load.noise_drop_table(res.noise.iloc[:0]).empty
    assert math.isnan(load.latent_scale(res.first_unit("tarflow_pixel"))["mu_std"])


def test_latent_statistics_tables(results):
    res = load.open_results(results, STUDY)
    stats = load.latent_stats_table(res.study_dir, res.per_seed)
    summary = load.latent_stats_summary(stats)
    assert list(summary.index) == list(VARIANTS)
    assert {"total_variation_mean", "total_variation_std", "n_seeds"} <= set(summary.columns)
    # a summary table without the statistics gets them from latent_stats.csv
    bare = res.per_seed.drop(columns=list(load.LATENT_STAT_COLUMNS))
    merged = load.latent_stats_table(res.study_dir, bare)
    np.testing.assert_allclose(merged["total_variation"], res.per_seed["total_variation"])
    channels, dead = load.channel_statistics(res, max_latents=8)
    assert set(channels["variant"]) == {"simflow", "frozen_vae"} and set(channels["latents"]) == {"mu", "z"}
    assert set(channels["channel"]) == {0, 1}
    # channel 2 is constant in μ and in z = μ + 0.5: skipped and counted
    assert dead == {(v, k): 1 for v in ("simflow", "frozen_vae") for k in ("mu", "z")}
    assert set(channels["statistic"]) == set(load.LATENT_STAT_COLUMNS)


def test_images_of_the_first_seed(results):
    res = load.open_results(results, STUDY)
    assert set(load.interpolations(res)) == {"simflow", "frozen_vae"}
    grids = load.sample_grids(res, k=5)
    assert set(grids) == set(VARIANTS) and grids["simflow"].shape == (5, 8, 8, 1)
    with np.load(res.first_unit("simflow") / "samples.npz") as npz:
        np.testing.assert_array_equal(load.first_images(res.first_unit("simflow") / "samples.npz", 50),
                                      npz["arr_0"])


def test_claims_table_shows_the_intervals(results):
    claims = json.loads((results / STUDY / "claims.json").read_text())
    table = load.claims_table(claims)
    assert list(table.index) == [c["id"] for c in claims]
    row = table.loc["gfid_vs_frozen_vae"]  # two paired seeds: simflow KID 0.020/0.021 vs 0.030/0.031
    c = claims[0]
    assert row["metric"] == "KID" and row["n"] == 2 and row["verdict"] == c["verdict"]
    assert row["95 % CI"] == f"[{c['ci_low']:.3g}, {c['ci_high']:.3g}]"
    assert row["Holm CI"].endswith(f"({100 * c['holm_confidence']:.1f} %)")
    assert row["difference"] == "simflow - frozen_vae (predicted < 0)"
    assert list(load.claims_table(claims, ids=["smoothness"]).index) == ["smoothness"]
    assert load.claims_table([]).empty


def test_real_floor_from_the_summary(results, tmp_path):
    res = load.open_results(results, STUDY)
    assert res.floor == {"fid": 4.5, "kid_mean": 0.0003, "kid_std": 0.0002, "num_images": 12.0}
    older = make_results(tmp_path / "old")
    summary = pd.read_csv(older / STUDY / "summary.csv").drop(columns=["fid_floor"])
    summary.to_csv(older / STUDY / "summary.csv", index=False)
    assert load.open_results(older, STUDY).floor is None


def test_claims_markdown(results):
    claims = json.loads((results / STUDY / "claims.json").read_text())
    text = load.claims_markdown(claims, ids=["smoothness"])
    assert text.count("* **") == 1 and "Evidence:" in text
    assert load.claims_markdown(claims).count("* **") == len(claims)


def test_mlflow_helpers(results, tmp_path, capsys):
    from simflow import tracking

    res = load.open_results(results, STUDY)
    assert load.open_mlflow(None, results) is None
    assert load.open_mlflow("default", tmp_path) is None  # no store there: not created
    assert "skipped" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tmp_path / "parent.txt"
    tracking.init_study(uri, "load-test", STUDY, parent)
    (variant, seed), unit = next(iter(res.units.items()))
    id_file = tmp_path / "unit" / "mlflow_run_id.txt"
    tracking.init_variant_run(uri, "load-test", parent, f"{variant}_s{seed}", id_file, variant=variant)
    with tracking.StageRun(uri, id_file, "train") as run:
        run.log_params_once({"model": {"mode": "end_to_end"}})
        for step in (1, 2, 3):
            run.log_metrics({"train/total": 1.0 / step}, step)
        run.log_metrics({"train/train_time_s": 9.0, "eval/fid": 20.0})
    client = load.open_mlflow(uri, tmp_path)
    runs = load.unit_runs(client, {(variant, seed): id_file.parent, ("other", 0): tmp_path / "none"})
    assert list(runs) == [(variant, seed)] and "no MLflow run for: other/s0" in capsys.readouterr().out
    params = load.run_params_table(runs, ["model.mode", "vae.posterior"])
    assert params.loc[(variant, seed), "model.mode"] == "end_to_end"
    assert params.loc[(variant, seed), "vae.posterior"] == "–"
    curves = load.training_curves(client, runs)
    assert set(curves["metric"]) == {"train/total"} and list(curves["step"]) == [1, 2, 3]
    prov = load.provenance_table(runs, res.per_seed)
    assert prov.loc[(variant, seed), "gFID (MLflow)"] == 20.0
    assert prov.loc[(variant, seed), "gFID (summary)"] == 20.0
    assert load.unit_runs(None, res.units) == {}


def test_show_displays_a_png(monkeypatch):
    pytest.importorskip("IPython")
    from matplotlib.figure import Figure

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    load.show(fig)
    assert shown and shown[0].data[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def test_summary_html_is_a_standalone_page_with_the_tables(results):
    study_dir = results / STUDY
    page = report.summary_html((study_dir / "summary.md").read_text(),
                               pd.read_csv(study_dir / "summary.csv"), title="Study fake")
    assert page.startswith("<!DOCTYPE html>") and "<title>Study fake</title>" in page
    assert page.count("<table") == 2  # the Markdown results table and all of summary.csv
    assert ">gFID</th>" in page and "<th>nll_bpd</th>" in page
    assert "http" not in page.split("<body>")[0]  # no external style or script


def test_parent_run_outputs(results):
    study_dir = results / STUDY
    out = report.parent_run_outputs(study_dir, figures=[study_dir / "fig.png"], notebooks=[])
    names = [p.name for p in out["artifacts"]["summary"]]
    assert names == ["summary.md", "summary.csv", "summary_per_seed.csv", "claims.json",
                     "latent_stats.csv", "noise_robustness.csv"]
    assert out["metrics"]["gfid/simflow"] == pytest.approx(20.5)
    assert "rfid/tarflow_pixel" not in out["metrics"] and "rfid/simflow" in out["metrics"]
    claims = json.loads((study_dir / "claims.json").read_text())
    assert {f"claim.{c['id']}" for c in claims} <= set(out["tags"])
    assert set(out["tags"].values()) <= set(VERDICTS) | {"3", "2"}
    assert out["tags"]["claim.gfid_vs_frozen_vae"] == claims[0]["verdict"]
    assert out["tags"]["variants"] == "3" and out["tags"]["seeds"] == "2"
    assert out["description"].startswith("# Study `fake`")


def test_run_description_is_cut_at_a_line_with_a_pointer():
    text = "\n".join(f"line {i}" for i in range(2000))
    cut = report.run_description(text, limit=500)
    assert len(cut) <= 500 and cut.endswith("summary/summary.md)\n") and "line 3\n" in cut
    assert report.run_description("short", limit=500) == "short"
