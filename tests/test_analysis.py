"""Tests for simflow.analysis.summary (seed aggregation, claims, Markdown report) and
simflow.analysis.figures (figures build, save as PNG + TrueType PDF, tolerate NaN)."""

from __future__ import annotations

import io
import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from simflow.analysis import figures
from scipy import stats

from simflow.analysis.summary import (
    DEFAULT_PAPER_MAPPING,
    ONE_SEED,
    PAPER_RESULTS,
    VERDICTS,
    aggregate_seeds,
    evaluate_claims,
    results_markdown,
)

STATS = ["spectral_entropy", "high_frequency_ratio", "total_variation", "autocorrelation"]


def summary_table(
    seeds: int = 1, *, simflow_fid: float = 10.0, smooth: bool = True
) -> pd.DataFrame:
    """A study summary: ``simflow`` better than its baselines unless told otherwise. Per seed,
    every variant moves by a shared 0.1·seed (the paired part) plus its own small scatter, so the
    per-seed differences have a spread and the paired test has something to measure."""
    base = {
        # variant: (group, fid, rfid, sigma, tv, autocorr)
        "simflow": (
            "latent",
            simflow_fid,
            1.0,
            0.5,
            0.6 if smooth else 1.0,
            0.8 if smooth else 0.2,
        ),
        "frozen_vae": ("latent", 15.0, 0.9, math.nan, 0.9, 0.5),
        "e2e_learnable": ("latent", 25.0, 2.0, math.nan, 0.7, 0.6),
        "simflow_repa": ("latent", 8.0, 1.1, 0.5, 0.6, 0.8),
        "frozen_encoder_noise": ("latent", 12.0, 1.3, math.nan, 0.8, 0.55),
        "sigma_0.25": ("sigma_sweep", 13.0, 0.7, 0.25, 0.7, 0.7),
        "sigma_1.0": ("sigma_sweep", 11.0, 1.6, 1.0, 0.5, 0.85),
        "tarflow_pixel": ("pixel", 30.0, math.nan, math.nan, math.nan, math.nan),
    }
    rows = []
    for seed in range(seeds):
        jitter = 0.1 * seed  # seeds 0, 1, 2 -> spread 0.1 around the base values
        for i, (variant, (group, fid, rfid, sigma, tv, ac)) in enumerate(base.items()):
            latent = group != "pixel"
            own = 0.02 * ((3 * i + 5 * seed) % 7 - 3) if seed else 0.0  # in [-0.06, 0.06]
            rows.append(
                {
                    "variant": variant,
                    "group": group,
                    "seed": seed,
                    "kid": (fid + jitter + own) / 1000,
                    "fid": fid + jitter,
                    "rfid": rfid,
                    "nll_bpd": 3.0 + jitter,
                    "sigma": sigma,
                    "spectral_entropy": 0.8 if latent else math.nan,
                    "high_frequency_ratio": 0.3 if latent else math.nan,
                    "total_variation": tv + jitter / 10 + own / 10,
                    "autocorrelation": ac + own / 10,
                    "train_time_s": 100.0,
                    "img_per_s": 50.0,
                }
            )
    df = pd.DataFrame(rows)
    return df if seeds > 1 else df.drop(columns="seed")


def noise_table(
    fixed_drop: float = 2.0, learnable_drop: float = 10.0, seeds: int = 1
) -> pd.DataFrame:
    rows = []
    levels = [0.0, 0.25, 0.5, 1.0]
    for seed in range(seeds):
        for variant, post, drop in (
            ("simflow", "fixed σ̄=0.5", fixed_drop),
            ("e2e_learnable", "learnable", learnable_drop),
            ("layernorm", "layernorm", 5.0),
        ):
            for s in levels:
                psnr = 30.0 - drop * s + 0.2 * seed
                rows.append(
                    {
                        "variant": variant,
                        "posterior": post,
                        "noise_std": s,
                        "psnr": psnr,
                        "mse": 10 ** (-psnr / 10),
                        "seed": seed,
                    }
                )
    return pd.DataFrame(rows)


def claim(claims: list[dict], cid: str) -> dict:
    return next(c for c in claims if c["id"] == cid)


# --- aggregate_seeds ---------------------------------------------------------------------------


def test_aggregate_seeds_numbers():
    df = pd.DataFrame(
        {
            "variant": ["a", "a", "a", "b"],
            "group": ["latent"] * 4,
            "seed": [0, 1, 2, 0],
            "fid": [1.0, 2.0, 4.0, 10.0],
            "total_variation": [0.5, math.nan, 0.7, math.nan],
        }
    )
    agg = aggregate_seeds(df).set_index("variant")
    assert agg.loc["a", "n_seeds"] == 3 and agg.loc["b", "n_seeds"] == 1
    assert agg.loc["a", "fid_mean"] == pytest.approx(7 / 3)
    assert agg.loc["a", "fid_std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert agg.loc["a", "total_variation_mean"] == pytest.approx(0.6)  # NaN skipped
    assert math.isnan(agg.loc["b", "fid_std"])  # one seed: no spread
    assert math.isnan(agg.loc["b", "total_variation_mean"])
    assert agg.loc["a", "group"] == "latent"
    assert "seed_mean" not in agg.columns and "variant_mean" not in agg.columns
    assert list(agg.index) == ["a", "b"]  # order of first appearance


def test_aggregate_seeds_requires_by_column():
    with pytest.raises(ValueError, match="missing column"):
        aggregate_seeds(pd.DataFrame({"fid": [1.0]}))


# --- evaluate_claims ---------------------------------------------------------------------------


def verdicts(claims: list[dict]) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in claims}


def test_claims_reproduced_on_favourable_data():
    claims = evaluate_claims(summary_table(seeds=3), noise_table(seeds=3))
    assert set(verdicts(claims).values()) == {"reproduced"}
    assert all(c["reproduced"] is True and c["holm_family"] == 5 for c in claims)
    c1 = claim(claims, "gfid_vs_frozen_vae")
    assert c1["metric"] == "KID" and c1["n"] == 3 and c1["seeds"] == [0, 1, 2]
    assert c1["mean_diff"] == pytest.approx(-0.005, abs=1e-4)  # KID (fid / 1000): 10.1 vs 15.1
    assert c1["ci_holm_low"] <= c1["ci_low"] < c1["mean_diff"] < c1["ci_high"] <= c1["ci_holm_high"] < 0
    assert c1["p"] <= c1["p_holm"] < 0.05
    assert "95 % CI" in c1["evidence"] and "Holm-corrected over 5 claims" in c1["evidence"]
    assert "Beside it, FID: simflow 10.10 vs frozen_vae 15.10" in c1["evidence"]
    c3 = claim(claims, "noise_robustness")
    # drop from noise 0 to 1: fixed 2 dB, learnable 10 dB
    assert c3["mean_a"] == pytest.approx(2.0) and c3["mean_b"] == pytest.approx(10.0)
    assert "simflow 2.00 vs e2e_learnable 10.00" in c3["evidence"]
    smooth = claim(claims, "smoothness")
    assert [m["metric"] for m in smooth["measures"]] == ["total variation", "autocorrelation"]
    assert smooth["p"] == max(m["p"] for m in smooth["measures"])  # the intersection-union test


def test_claims_refuted_on_unfavourable_data():
    df = summary_table(seeds=3, simflow_fid=40.0, smooth=False)
    claims = evaluate_claims(df, noise_table(fixed_drop=12.0, learnable_drop=3.0, seeds=3))
    assert verdicts(claims) == {
        "gfid_vs_frozen_vae": "refuted",
        "fixed_vs_learnable_gfid": "refuted",
        "noise_robustness": "refuted",
        "smoothness": "refuted",
        "repa_gfid": "reproduced",  # REPA (8) still beats a worse SimFlow (40)
    }
    assert claim(claims, "gfid_vs_frozen_vae")["reproduced"] is False
    assert claim(claims, "gfid_vs_frozen_vae")["ci_holm_low"] > 0


def test_one_seed_gives_a_point_estimate_never_a_verdict():
    claims = evaluate_claims(summary_table(seeds=1), noise_table())
    assert set(verdicts(claims).values()) == {ONE_SEED}
    for c in claims:
        assert c["reproduced"] is None and c["n"] == 1 and c["p"] is None and c["p_holm"] is None
        assert c["ci_low"] is None and c["ci_holm_low"] is None and c["holm_family"] is None
    c1 = claim(claims, "gfid_vs_frozen_vae")
    assert c1["mean_diff"] == pytest.approx(-0.005) and "a point estimate, no test" in c1["evidence"]


def test_a_small_gap_is_inconclusive():
    # simflow 14.9 vs frozen 15.0 on FID, but on KID the per-seed scatter (±0.06/1000) is as large
    # as the gap (0.1/1000): the interval includes zero.
    c = claim(evaluate_claims(summary_table(seeds=3, simflow_fid=14.9)), "gfid_vs_frozen_vae")
    assert c["verdict"] == "inconclusive" and c["reproduced"] is None
    assert c["ci_holm_low"] < 0 < c["ci_holm_high"] and c["p_holm"] >= 0.05
    assert "The Holm-corrected interval includes zero" in c["evidence"]


def pair_table(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """simflow, frozen_vae and e2e_learnable over len(diffs) seeds: KID of simflow minus the other
    variant's, per seed, as given under "frozen_vae" / "e2e_learnable"; smoothness clearly holds."""
    rows = []
    for seed in range(len(diffs["frozen_vae"])):
        base = 0.01 * (1 + seed)
        rows.append({"variant": "simflow", "seed": seed, "kid": base, "fid": 1.0,
                     "total_variation": 0.5 + 0.001 * seed, "autocorrelation": 0.9 - 0.002 * seed})
        for other in ("frozen_vae", "e2e_learnable"):
            rows.append({"variant": other, "seed": seed, "kid": base - diffs[other][seed], "fid": 2.0,
                         "total_variation": 0.8 - 0.003 * seed, "autocorrelation": 0.4 + 0.001 * seed})
    return pd.DataFrame(rows)


def test_holm_turns_a_raw_significant_claim_inconclusive():
    d = [-0.010, -0.006, -0.013, -0.004]  # p ≈ 0.02 alone
    claims = evaluate_claims(pair_table({"frozen_vae": d, "e2e_learnable": d}))
    p = stats.ttest_1samp(d, 0.0).pvalue
    gfid, learn = claim(claims, "gfid_vs_frozen_vae"), claim(claims, "fixed_vs_learnable_gfid")
    smooth = claim(claims, "smoothness")
    assert gfid["p"] == pytest.approx(p) and p < 0.05
    # family of 3 (the others are missing): smoothness's tiny p first, then the two ties at 2p
    assert gfid["holm_family"] == 3 and smooth["p_holm"] == pytest.approx(3 * smooth["p"])
    assert gfid["p_holm"] == pytest.approx(2 * p) and learn["p_holm"] == pytest.approx(2 * p)
    assert 2 * p > 0.05 and gfid["verdict"] == learn["verdict"] == "inconclusive"
    # the raw interval excludes zero, the Holm-corrected one (at 1 - 0.05/2) does not
    assert gfid["ci_high"] < 0 < gfid["ci_holm_high"] and gfid["holm_confidence"] == pytest.approx(0.975)
    lo, hi = stats.ttest_1samp(d, 0.0).confidence_interval(0.975)
    assert (gfid["ci_holm_low"], gfid["ci_holm_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert smooth["verdict"] == "reproduced"


def test_missing_pairs_are_dropped_and_named():
    df = summary_table(seeds=4)
    df = df[~((df["variant"] == "frozen_vae") & (df["seed"] == 3))]
    c = claim(evaluate_claims(df), "gfid_vs_frozen_vae")
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2] and c["dropped_seeds"] == {"simflow": [3]}
    assert "left out, no paired seed: seed 3 of simflow" in c["evidence"]
    assert claim(evaluate_claims(df), "repa_gfid")["n"] == 4  # unaffected


def test_smoothness_claim_inconclusive_when_measures_disagree():
    df = summary_table(seeds=3)
    df.loc[df["variant"] == "simflow", "autocorrelation"] = [0.1, 0.11, 0.12]  # TV says smoother, AC not
    c = claim(evaluate_claims(df), "smoothness")
    assert c["verdict"] == "inconclusive" and "disagree" in c["evidence"]


def test_gfid_claims_fall_back_to_fid_without_kid_and_say_so():
    df = summary_table(seeds=3).drop(columns="kid")
    c = claim(evaluate_claims(df), "gfid_vs_frozen_vae")
    assert c["metric"] == "FID" and "no KID" in c["evidence"] and "biased" in c["evidence"]


def test_claims_missing_variants_and_data():
    df = summary_table(seeds=3)
    df = df[~df["variant"].isin(["simflow_repa", "e2e_learnable"])]
    claims = evaluate_claims(df)
    c = claim(claims, "repa_gfid")
    assert c["verdict"] == "inconclusive" and c["n"] is None and c["p_holm"] is None
    assert c["evidence"] == ("variant simflow_repa not in this study; variant simflow_repa not in this study")
    assert "variant e2e_learnable not in this study" in claim(claims, "fixed_vs_learnable_gfid")["evidence"]
    assert claim(claims, "noise_robustness")["verdict"] == "inconclusive"
    # the two claims that can be tested are the Holm family
    assert claim(claims, "gfid_vs_frozen_vae")["holm_family"] == 2
    assert claim(claims, "gfid_vs_frozen_vae")["verdict"] == "reproduced"
    # A diverged run (NaN FID and KID) is inconclusive, not a win for either side.
    df2 = summary_table(seeds=3)
    df2.loc[df2["variant"] == "frozen_vae", ["fid", "kid"]] = math.nan
    c = claim(evaluate_claims(df2), "gfid_vs_frozen_vae")
    assert c["verdict"] == "inconclusive" and "NaN" in c["evidence"]


def test_claims_json_is_valid_json_with_the_documented_keys():
    claims = evaluate_claims(summary_table(seeds=3), noise_table(seeds=3))
    back = json.loads(json.dumps(claims, allow_nan=False))
    keys = {"id", "claim", "verdict", "reproduced", "evidence", "variants", "metric", "difference",
            "predicted", "n", "seeds", "dropped_seeds", "mean_a", "mean_b", "mean_diff", "std_diff", "ci_low",
            "ci_high", "p", "ci_holm_low", "ci_holm_high", "p_holm", "holm_confidence", "holm_family",
            "measures"}
    assert all(set(c) == keys for c in back)
    assert all(c["verdict"] in VERDICTS for c in back)


def test_noise_claim_falls_back_to_posterior_labels():
    noise = noise_table(seeds=3).replace(
        {"variant": {"simflow": "vae_fixed", "e2e_learnable": "vae_learn"}}
    )
    c = claim(evaluate_claims(summary_table(seeds=3), noise), "noise_robustness")
    assert c["verdict"] == "reproduced" and "vae_fixed" in c["evidence"] and "vae_learn" in c["evidence"]


# --- results_markdown --------------------------------------------------------------------------


def test_results_markdown_contents():
    df = summary_table(simflow_fid=40.0)
    md = results_markdown(df, evaluate_claims(df))
    for key in ("SimFlow", "SimFlow + REPA-E", "STARFlow", "TarFlow"):
        assert f"{PAPER_RESULTS[key]['value']:.2f}" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "2.15" in rows["simflow"] and "1.91" in rows["simflow_repa"]
    assert "2.40" in rows["frozen_encoder_noise"] and "2.90" in rows["tarflow_pixel"]
    assert "no VAE latent" in rows["tarflow_pixel"] and "no VAE latent" not in rows["simflow"]
    assert rows["simflow"].rstrip().endswith("|  |")  # empty note for a latent variant
    assert "40.00" in rows["simflow"]
    assert "point estimate (one seed)" in md  # one seed: no verdict
    assert "inconclusive" in md  # no noise table given
    assert "## Claims" in md and "Holm" in md
    assert "own latent space" in md  # the NLL column says it compares different spaces
    md3 = results_markdown(summary_table(seeds=3, simflow_fid=40.0),
                           evaluate_claims(summary_table(seeds=3, simflow_fid=40.0)),
                           floor={"fid": 3.21, "kid_mean": 0.0004, "kid_std": 0.0002, "num_images": 500})
    assert "1. **refuted**" in md3 and "95 % CI [" in md3  # simflow 40 vs frozen_vae 15
    assert "Real-vs-real floor: 500 real test images against the reference give FID 3.21, KID 0.0004" in md3


def test_results_markdown_seeds_and_custom_mapping():
    df = summary_table(seeds=3)
    md = results_markdown(df, [], mapping={"frozen_vae": "STARFlow"})
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "10.10 ± 0.10" in rows["simflow"]  # fids 10.0, 10.1, 10.2
    assert "2.40" in rows["frozen_vae"] and "2.15" not in rows["simflow"]
    assert "No claims were evaluated." in md
    # A latent variant whose statistics failed is not mislabelled as pixel-space.
    df.loc[df["variant"] == "frozen_vae", STATS] = math.nan
    md = results_markdown(df, [])
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "latent statistics missing" in rows["frozen_vae"]
    with pytest.raises(ValueError, match="not in PAPER_RESULTS"):
        results_markdown(df, [], mapping={"simflow": "DiT"})


def test_results_markdown_rejects_malformed_claims():
    with pytest.raises(ValueError, match="missing key"):
        results_markdown(summary_table(), [{"claim": "x", "reproduced": True}])
    with pytest.raises(ValueError, match="True, False or None"):
        results_markdown(summary_table(), [{"claim": "x", "reproduced": "yes", "evidence": ""}])


def test_default_mapping_targets_exist():
    assert set(DEFAULT_PAPER_MAPPING.values()) <= set(PAPER_RESULTS)
    assert PAPER_RESULTS["SimFlow"]["value"] == 2.15


# --- figures -----------------------------------------------------------------------------------


def images(k: int, size: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(k, size, size, c), dtype=np.uint8)


def curves_table() -> pd.DataFrame:
    rows = []
    for variant in ("simflow", "frozen_vae"):
        for seed in (0, 1):
            for step in range(0, 100, 10):
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "step": step,
                        "metric": "loss",
                        "value": 1.0 / (step + 1) + 0.01 * seed,
                    }
                )
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "step": step,
                        "metric": "nll_bpd",
                        "value": math.nan if step == 50 else 4.0 - step / 100,
                    }
                )
    return pd.DataFrame(rows)


def all_figures() -> dict[str, Figure]:
    return {
        "noise": figures.fig_noise_robustness(noise_table(seeds=2)),
        "interp": figures.fig_interpolations({"simflow": images(7), "frozen_vae": images(5, c=1)}),
        "stats": figures.fig_latent_stats(summary_table(seeds=2)),
        "fid": figures.fig_fid(summary_table(seeds=2)),
        "curves": figures.fig_training_curves(curves_table()),
        "grids": figures.fig_sample_grids({"a": images(20), "b": images(16, c=4)}, nrow=8),
    }


def assert_truetype_pdf(path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert b"/Type3" not in data and b"/FontType 3" not in data
    # Type 42 output: a TrueType program (FontFile2), as a simple /TrueType font or, for text
    # with non-Latin-1 glyphs such as σ̄, a /Type0 font with a /CIDFontType2 descendant.
    assert b"/FontFile2" in data
    assert b"/TrueType" in data or b"/CIDFontType2" in data


def test_figures_save_png_and_truetype_pdf(tmp_path):
    for name, fig in all_figures().items():
        assert isinstance(fig, Figure)
        paths = figures.save_figure(fig, tmp_path / "sub" / name)
        assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
        png, pdf = paths
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
        assert_truetype_pdf(pdf)


def test_font_check_detects_type3(tmp_path):
    # The check above is meaningful: a plain savefig under matplotlib's default (Type 3) fails it.
    fig = figures.fig_fid(summary_table())
    with matplotlib.rc_context({"pdf.fonttype": 3}):
        fig.savefig(tmp_path / "t3.pdf")
    with pytest.raises(AssertionError):
        assert_truetype_pdf(tmp_path / "t3.pdf")


def test_save_figure_strips_extension(tmp_path):
    fig = figures.fig_sample_grids({"a": images(4)}, nrow=2)
    paths = figures.save_figure(fig, tmp_path / "grid.png")
    assert [p.name for p in paths] == ["grid.png", "grid.pdf"] and all(p.exists() for p in paths)


def test_figure_contents():
    fig = figures.fig_latent_stats(summary_table())
    axes = fig.axes
    assert len(axes) == 4
    # tarflow_pixel has no latent stats: excluded from the x axis; 7 latent variants remain.
    labels = [t.get_text() for t in axes[2].get_xticklabels()]
    assert "tarflow_pixel" not in labels and len(labels) == 7
    assert len(axes[2].patches) == 7

    floor = {"fid": 2.5, "kid_mean": 0.001, "kid_std": 0.0005, "num_images": 500}
    fig = figures.fig_fid(summary_table(), floor=floor)
    assert len(fig.axes) == 3  # FID bars, KID bars, sigma sweep
    # the real-vs-real floor: a horizontal line at its value on the FID and the KID panels
    assert [tuple(line.get_ydata()) for line in fig.axes[0].lines if line.get_linestyle() == ":"] == [(2.5, 2.5)]
    assert [tuple(line.get_ydata()) for line in fig.axes[1].lines if line.get_linestyle() == ":"] == [(0.001, 0.001)]
    assert "KID real vs real (500 test images)" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert len(figures.fig_fid(summary_table().drop(columns="kid")).axes) == 2  # no KID panel
    sweep = fig.axes[2]
    xs = sorted(sweep.lines[0].get_xdata())
    assert xs == [0.25, 0.5, 1.0]  # the sigma_sweep group + simflow (0.5), not simflow_repa
    assert list(sweep.lines[0].get_ydata()) == [13.0, 10.0, 11.0]
    fig = figures.fig_fid(summary_table(), sweep_reference=None)
    assert sorted(fig.axes[2].lines[0].get_xdata()) == [0.25, 1.0]
    bar_labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "sigma_0.25" not in bar_labels and "simflow" in bar_labels

    fig = figures.fig_noise_robustness(noise_table())
    assert len(fig.axes[0].lines) == 3
    assert "simflow (fixed σ̄=0.5)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

    fig = figures.fig_interpolations({"a": images(3), "b": images(4), "c": images(2)})
    assert len(fig.axes) == 3

    fig = figures.fig_training_curves(curves_table(), metrics=["nll_bpd"])
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2


def test_figures_tolerate_nan(tmp_path):
    df = summary_table()
    df.loc[df["variant"] == "frozen_vae", STATS + ["fid"]] = math.nan
    df["rfid"] = None  # an all-missing column, object dtype as it can come from JSON
    for fig in (figures.fig_latent_stats(df), figures.fig_fid(df)):
        fig.savefig(io.BytesIO(), format="png", dpi=50)  # drawing must not fail on NaN bars
    # Only pixel-space variants: every latent panel says "no data" instead of failing.
    pixel = df[df["group"] == "pixel"]
    fig = figures.fig_latent_stats(pixel)
    assert all("no data" in [t.get_text() for t in ax.texts] for ax in fig.axes)
    # No finite sigma: the FID and KID panels only.
    assert len(figures.fig_fid(pixel).axes) == 2
    noise = noise_table()
    noise["psnr"] = math.nan
    fig = figures.fig_noise_robustness(noise)
    assert "no data" in [t.get_text() for t in fig.axes[0].texts]


def test_figures_reject_bad_input():
    with pytest.raises(ValueError, match="missing column"):
        figures.fig_noise_robustness(pd.DataFrame({"variant": ["a"], "psnr": [1.0]}))
    with pytest.raises(ValueError, match="no rows"):
        figures.fig_fid(summary_table().iloc[:0])
    with pytest.raises(ValueError, match="uint8"):
        figures.fig_interpolations({"a": images(3).astype(np.float32)})
    with pytest.raises(ValueError, match=r"\(K, H, W, C\)"):
        figures.fig_sample_grids({"a": images(3)[0]})
    with pytest.raises(ValueError, match="non-empty"):
        figures.fig_sample_grids({})
    with pytest.raises(ValueError, match="nrow"):
        figures.fig_sample_grids({"a": images(3)}, nrow=0)
    with pytest.raises(ValueError, match="unknown metric"):
        figures.fig_training_curves(curves_table(), metrics=["fid"])
    with pytest.raises(ValueError, match="latent statistic"):
        figures.fig_latent_stats(pd.DataFrame({"variant": ["a"], "fid": [1.0]}))
