"""Tests for simflow.analysis.summary (seed aggregation, claims, Markdown report) and
simflow.analysis.figures (figures build, save as PNG + TrueType PDF, tolerate NaN)."""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from simflow.analysis import figures
from simflow.analysis.summary import (
    DEFAULT_PAPER_MAPPING,
    PAPER_RESULTS,
    aggregate_seeds,
    evaluate_claims,
    results_markdown,
)

STATS = ["spectral_entropy", "high_frequency_ratio", "total_variation", "autocorrelation"]


def summary_table(
    seeds: int = 1, *, simflow_fid: float = 10.0, smooth: bool = True
) -> pd.DataFrame:
    """A study summary: ``simflow`` better than its baselines unless told otherwise."""
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
        for variant, (group, fid, rfid, sigma, tv, ac) in base.items():
            latent = group != "pixel"
            rows.append(
                {
                    "variant": variant,
                    "group": group,
                    "seed": seed,
                    "fid": fid + jitter,
                    "rfid": rfid,
                    "nll_bpd": 3.0 + jitter,
                    "sigma": sigma,
                    "spectral_entropy": 0.8 if latent else math.nan,
                    "high_frequency_ratio": 0.3 if latent else math.nan,
                    "total_variation": tv + jitter / 10,
                    "autocorrelation": ac,
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


def test_claims_reproduced_on_favourable_data():
    claims = evaluate_claims(summary_table(), noise_table())
    assert [c["reproduced"] for c in claims] == [True] * 5
    c1 = claim(claims, "gfid_vs_frozen_vae")
    assert "10.00" in c1["evidence"] and "15.00" in c1["evidence"]
    c3 = claim(claims, "noise_robustness")
    # drop from noise 0 to 1: fixed 2 dB, learnable 10 dB
    assert "2.00 dB" in c3["evidence"] and "10.00 dB" in c3["evidence"]


def test_claims_not_reproduced_on_unfavourable_data():
    df = summary_table(simflow_fid=40.0, smooth=False)
    claims = evaluate_claims(df, noise_table(fixed_drop=12.0, learnable_drop=3.0))
    status = {c["id"]: c["reproduced"] for c in claims}
    assert status == {
        "gfid_vs_frozen_vae": False,
        "fixed_vs_learnable_gfid": False,
        "noise_robustness": False,
        "smoothness": False,
        "repa_gfid": True,  # REPA (8) still beats a worse SimFlow (40)
    }


def test_smoothness_claim_inconclusive_when_measures_disagree():
    df = summary_table()
    df.loc[df["variant"] == "simflow", "autocorrelation"] = 0.1  # TV says smoother, AC says not
    c = claim(evaluate_claims(df), "smoothness")
    assert c["reproduced"] is None and "disagree" in c["evidence"]


def test_claims_missing_variants_and_data():
    df = summary_table()
    df = df[~df["variant"].isin(["simflow_repa", "e2e_learnable"])]
    claims = evaluate_claims(df)
    assert claim(claims, "repa_gfid") == {
        "id": "repa_gfid",
        "claim": claim(claims, "repa_gfid")["claim"],
        "reproduced": None,
        "evidence": "variant simflow_repa not in this study",
    }
    assert (
        claim(claims, "fixed_vs_learnable_gfid")["evidence"]
        == "variant e2e_learnable not in this study"
    )
    assert claim(claims, "noise_robustness")["reproduced"] is None
    assert claim(claims, "gfid_vs_frozen_vae")["reproduced"] is True
    # A diverged run (NaN FID) is inconclusive, not a win for either side.
    df2 = summary_table()
    df2.loc[df2["variant"] == "frozen_vae", "fid"] = math.nan
    c = claim(evaluate_claims(df2), "gfid_vs_frozen_vae")
    assert c["reproduced"] is None and "NaN" in c["evidence"]


def test_claims_with_seeds_report_spread():
    claims = evaluate_claims(summary_table(seeds=3), noise_table(seeds=2))
    c1 = claim(claims, "gfid_vs_frozen_vae")
    assert c1["reproduced"] is True
    assert "n=3" in c1["evidence"] and "exceeds the seed spread" in c1["evidence"]
    # Make the gap smaller than the spread.
    df = summary_table(seeds=3, simflow_fid=14.9)
    c = claim(evaluate_claims(df), "gfid_vs_frozen_vae")
    # simflow 15.0 ± 0.1 vs frozen 15.1 ± 0.1: simflow's mean is lower, but the gap is within
    # the seed spread, so the claim is neither reproduced nor refuted.
    assert c["reproduced"] is None and "within the seed spread" in c["evidence"]
    assert "inconclusive" in c["evidence"]
    # The same means from one seed each have no spread to compare with: the means decide.
    one_seed = df[df["seed"] == 1]
    assert claim(evaluate_claims(one_seed), "gfid_vs_frozen_vae")["reproduced"] is True


def test_smoothness_within_seed_spread_is_inconclusive():
    df = summary_table(seeds=3)
    # Both measures favour simflow, but its total variation scatters over seeds by more than
    # the gap to frozen_vae (0.6 vs 0.9 on average).
    is_simflow = df["variant"] == "simflow"
    df.loc[is_simflow, "total_variation"] = [0.2, 0.6, 1.0]
    c = claim(evaluate_claims(df), "smoothness")
    assert c["reproduced"] is None and "within the seed spread" in c["evidence"]
    # With a tight spread the same means reproduce the claim.
    df.loc[is_simflow, "total_variation"] = [0.59, 0.6, 0.61]
    assert claim(evaluate_claims(df), "smoothness")["reproduced"] is True


def test_noise_claim_within_seed_spread_is_inconclusive():
    noise = noise_table(fixed_drop=4.0, learnable_drop=5.0, seeds=3)
    # Seed 2 of the fixed-σ̄ VAE loses 4 dB more at the largest noise level: drops 4, 4, 8 dB
    # (mean 5.33 ± 2.31) against 5 ± 0 dB, a gap within the spread.
    worse = (noise["variant"] == "simflow") & (noise["seed"] == 2) & (noise["noise_std"] == 1.0)
    noise.loc[worse, "psnr"] -= 4.0
    c = claim(evaluate_claims(summary_table(seeds=3), noise), "noise_robustness")
    assert c["reproduced"] is None and "within the seed spread" in c["evidence"]


def test_noise_claim_falls_back_to_posterior_labels():
    noise = noise_table().replace(
        {"variant": {"simflow": "vae_fixed", "e2e_learnable": "vae_learn"}}
    )
    c = claim(evaluate_claims(summary_table(), noise), "noise_robustness")
    assert c["reproduced"] is True and "vae_fixed" in c["evidence"] and "vae_learn" in c["evidence"]


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
    assert "not reproduced" in md  # simflow 40 vs frozen_vae 15
    assert "inconclusive" in md  # no noise table given
    assert "## Claims" in md


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

    fig = figures.fig_fid(summary_table())
    assert len(fig.axes) == 2  # bars + sigma sweep
    sweep = fig.axes[1]
    xs = sorted(sweep.lines[0].get_xdata())
    assert xs == [0.25, 0.5, 1.0]  # the sigma_sweep group + simflow (0.5), not simflow_repa
    assert list(sweep.lines[0].get_ydata()) == [13.0, 10.0, 11.0]
    fig = figures.fig_fid(summary_table(), sweep_reference=None)
    assert sorted(fig.axes[1].lines[0].get_xdata()) == [0.25, 1.0]
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
    # No finite sigma: a single panel.
    assert len(figures.fig_fid(pixel).axes) == 1
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
