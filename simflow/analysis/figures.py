"""Figures of a finished study (the paper's Figures 3-5 plus training curves and sample grids).

Every ``fig_*`` function builds and returns a :class:`matplotlib.figure.Figure`; the caller saves
it with :func:`save_figure`, which writes a PNG (200 dpi, rendered by Agg) and a PDF whose fonts
are embedded as TrueType (``pdf.fonttype = ps.fonttype = 42``) rather than Type 3, as journals
require. Figures are created without ``pyplot``, so nothing here changes the global backend or
keeps figures alive in pyplot's registry; they still display inline in Jupyter.

Input formats (written per study under ``results/<study>/`` by the evaluation stages):

* summary table: DataFrame ``variant, group, fid, rfid, nll_bpd, sigma, spectral_entropy,
  high_frequency_ratio, total_variation, autocorrelation, train_time_s, img_per_s`` and
  optionally ``seed`` (one row per ``(variant, seed)``);
* noise robustness: DataFrame ``variant, posterior, noise_std, psnr, mse`` (optionally ``seed``);
* training curves: DataFrame ``variant, step, metric, value`` (optionally ``seed``);
* interpolations / sample grids: ``dict`` variant -> uint8 array ``(K, H, W, C)``, ``C`` in
  {1, 3, 4}.

Missing values (NaN cells, e.g. pixel-space variants have no latent statistics) are skipped.
A panel left with no data shows "no data" instead of failing; a missing column or an empty input
raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from simflow.analysis.latent_stats import BY_NAME, LATENT_STAT_COLUMNS
from simflow.contracts import RATE_SWEEP, SIGMA_SWEEP
from simflow.analysis.summary import _require_columns, aggregate_seeds

__all__ = [
    "SAVE_RC",
    "save_figure",
    "fig_noise_robustness",
    "fig_gfid_training",
    "fig_rate_sweep",
    "fig_channel_stats",
    "fig_interpolations",
    "fig_latent_stats",
    "fig_fid",
    "fig_training_curves",
    "fig_sample_grids",
]

#: rcParams applied while saving: TrueType (Type 42) fonts in PDF/PS instead of Type 3.
SAVE_RC: dict[str, object] = {"pdf.fonttype": 42, "ps.fonttype": 42}

# rcParams applied while building a figure (artists read most of them at creation time).
_STYLE_RC: dict[str, object] = {
    **SAVE_RC,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}




# --- helpers -------------------------------------------------------------------------------------


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Write ``<path_stem>.png`` (200 dpi) and ``<path_stem>.pdf`` (TrueType fonts).

    Args:
        fig: the figure to save.
        path_stem: output path without extension; a trailing ``.png`` or ``.pdf`` is dropped.
            Parent directories are created.

    Returns:
        ``[png_path, pdf_path]``.
    """
    stem = Path(path_stem)
    if stem.suffix.lower() in {".png", ".pdf"}:
        stem = stem.with_suffix("")
    if not stem.name:
        raise ValueError(f"path_stem must name a file, got {str(path_stem)!r}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    with matplotlib.rc_context(SAVE_RC):
        fig.savefig(paths[0], dpi=200, bbox_inches="tight")
        fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _require_df(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """The summary's column check, plus: a figure needs at least one row."""
    _require_columns(df, columns, what)
    if df.empty:
        raise ValueError(f"{what} has no rows; nothing to plot")


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _colors(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A stable colour per name (order of first appearance), from tab10 then tab20."""
    names = list(dict.fromkeys(names))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _numeric(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A copy of ``df`` with ``columns`` (those present) coerced to float; bad cells become NaN.

    An all-missing column read from CSV/JSON can arrive as ``object`` dtype (``None`` cells);
    coercing keeps it a numeric column so that it aggregates to NaN instead of vanishing.
    """
    df = df.copy()
    for c in columns:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _finite_mask(s: pd.Series) -> np.ndarray:
    return np.isfinite(pd.to_numeric(s, errors="coerce").to_numpy(dtype=float))


def _mean_std_by(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Mean, std (ddof=1, NaN for one seed) and count of ``value`` per ``keys``, NaNs dropped."""
    d = df[_finite_mask(df[value])]
    g = d.groupby(keys, sort=False)[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.size()}).reset_index()


def _check_images(d: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Validate a dict variant -> uint8 (K, H, W, C) array; return it with C=1 squeezed."""
    if not isinstance(d, Mapping) or not d:
        raise ValueError(f"{what} must be a non-empty dict variant -> uint8 array (K, H, W, C)")
    out = {}
    for name, arr in d.items():
        a = np.asarray(arr)
        if a.ndim != 4 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0:
            raise ValueError(
                f"{what}[{name!r}] must have shape (K, H, W, C) with K >= 1 and C in (1, 3, 4), "
                f"got {a.shape}"
            )
        if a.dtype != np.uint8:
            raise ValueError(
                f"{what}[{name!r}] must be uint8 images in [0, 255], got dtype {a.dtype}; convert "
                "with (x.clip(0, 1) * 255).round().astype(np.uint8)"
            )
        out[str(name)] = a
    return out


def _tile(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile ``images`` (K, H, W, C) into a grid of ``ncol`` columns with white padding."""
    k, h, w, c = images.shape
    ncol = max(1, min(ncol, k))
    nrows = math.ceil(k / ncol)
    canvas = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(k):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    return canvas


def _show(ax: Axes, img: np.ndarray) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# --- figures -------------------------------------------------------------------------------------


def fig_noise_robustness(df: pd.DataFrame) -> Figure:
    """Paper Figure 3a: reconstruction PSNR against the std of noise added to the latents.

    One line per VAE (labelled ``variant (posterior)`` when a ``posterior`` column exists), the
    mean over seeds with a ±1 std band when several seeds are present. With a ``noise_rel``
    column a second panel puts the noise in each VAE's own latent units (noise std / the std of
    its posterior means), so a decoder that ignores a tiny latent cannot look robust.

    Args:
        df: columns ``variant, noise_std, psnr`` (+ ``noise_rel``, ``posterior``, ``mse``, ``seed``).
    """
    _require_df(df, ["variant", "noise_std", "psnr"], "the noise-robustness table")
    axes_x = [("noise_std", "std of noise added to the latents")]
    if "noise_rel" in df.columns and _finite_mask(pd.to_numeric(df["noise_rel"], errors="coerce")).any():
        axes_x.append(("noise_rel", "noise std / std of the latent means"))
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(3.6 * len(axes_x) + 2.9, 3.2)  # room for the legend at the right
        axes = fig.subplots(1, len(axes_x), squeeze=False)[0]
        colors = _colors(list(df["variant"].astype(str)))
        for ax, (column, xlabel) in zip(axes, axes_x, strict=True):
            stats = _mean_std_by(_numeric(df, [column]), ["variant", "noise_std"], "psnr")
            if stats.empty:
                _no_data(ax)
                continue
            xs = _numeric(df, [column]).groupby(["variant", "noise_std"], sort=False)[column].mean()
            for variant, rows in stats.groupby("variant", sort=False):
                rows = rows.sort_values("noise_std")
                label = str(variant)
                if "posterior" in df.columns:
                    post = df.loc[df["variant"] == variant, "posterior"].dropna().astype(str).unique()
                    if len(post) == 1:
                        label += f" ({post[0]})"
                color = colors[str(variant)]
                x = np.array([xs[(variant, n)] for n in rows["noise_std"]], dtype=float)
                y, sd = rows["mean"].to_numpy(float), rows["std"].to_numpy(float)
                ax.plot(x, y, marker="o", ms=3, color=color, label=label)
                if np.isfinite(sd).any():
                    sd = np.nan_to_num(sd)
                    ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.2, lw=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("reconstruction PSNR (dB)")
        # Outside the axes: with a dozen VAEs an inside legend covers the curves.
        axes[-1].legend(frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def fig_gfid_training(curves: pd.DataFrame) -> Figure:
    """Paper Figure 2 at study scale: gFID of small sample sets during training, against the
    training step and against wall-clock (a frozen variant's clock starts after its VAE's
    pre-training, which its compute includes). Mean over seeds, ±1 std band.

    Args:
        curves: columns ``variant, step, fid`` (+ ``total_time_s``, ``seed``), e.g. fid_curves.csv.
    """
    _require_df(curves, ["variant", "step", "fid"], "the gFID-curve table")
    panels = [("step", "training step")]
    if "total_time_s" in curves.columns:
        panels.append(("total_time_s", "wall-clock of training (s), VAE pre-training included"))
    colors = _colors(list(dict.fromkeys(curves["variant"].astype(str))))
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(3.8 * len(panels) + 2.4, 3.2)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        data = _numeric(curves.assign(variant=curves["variant"].astype(str)), ["step", "fid", "total_time_s"]
                        if "total_time_s" in curves.columns else ["step", "fid"])
        for ax, (column, xlabel) in zip(axes, panels, strict=True):
            stats = _mean_std_by(data, ["variant", "step"], "fid")
            if stats.empty:
                _no_data(ax)
                continue
            xs = data.groupby(["variant", "step"], sort=False)[column].mean()
            for variant, rows in stats.groupby("variant", sort=False):
                rows = rows.sort_values("step")
                x = np.array([xs[(variant, st)] for st in rows["step"]], dtype=float)
                y, sd = rows["mean"].to_numpy(float), rows["std"].to_numpy(float)
                ax.plot(x, y, marker="o", ms=2.5, lw=1, color=colors[variant], label=variant)
                if np.isfinite(sd).any():
                    sd = np.nan_to_num(sd)
                    ax.fill_between(x, y - sd, y + sd, color=colors[variant], alpha=0.15, lw=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("gFID (small-sample probe)")
            ax.set_yscale("log")
        axes[-1].legend(frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def fig_rate_sweep(df: pd.DataFrame, reference: str | None = "simflow") -> Figure:
    """The rate-weight sweep: rFID, gFID and the rate against the effective NLL weight w (per
    latent dim, the mean of the last log window), for the ``rate_sweep`` group plus
    ``reference`` (the default, calibrated run, drawn as a star). Mean ± std over seeds.

    Args:
        df: the per-seed summary (``variant, group, nll_weight, fid, rfid, rate_per_dim``).
    """
    _require_df(df, ["variant", "group", "nll_weight"], "the summary table")
    df = _numeric(df, ["nll_weight", "fid", "rfid", "rate_per_dim"])
    rows = df[(df["group"].astype(str) == RATE_SWEEP) | (df["variant"].astype(str) == str(reference))]
    rows = rows[_finite_mask(rows["nll_weight"])]
    panels = [("fid", "gFID"), ("rfid", "rFID"), ("rate_per_dim", "rate (nats / latent dim)")]
    panels = [(c, t) for c, t in panels if c in rows.columns]
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(3.0 * len(panels), 3.0)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        agg = aggregate_seeds(rows, by="variant") if not rows.empty else pd.DataFrame()
        for ax, (column, title) in zip(axes, panels, strict=True):
            ax.set_title(title)
            if agg.empty or not np.isfinite(agg[f"{column}_mean"].to_numpy(float)).any():
                _no_data(ax)
                continue
            sweep = agg[agg["variant"].astype(str) != str(reference)].sort_values("nll_weight_mean")
            yerr = np.where((sweep["n_seeds"] > 1) & np.isfinite(sweep[f"{column}_std"]), sweep[f"{column}_std"], 0)
            ax.errorbar(sweep["nll_weight_mean"], sweep[f"{column}_mean"], yerr=yerr, marker="o", ms=3,
                        capsize=2, color="C0", label="fixed decoder scale b")
            ref = agg[agg["variant"].astype(str) == str(reference)]
            if not ref.empty:
                ax.errorbar(ref["nll_weight_mean"], ref[f"{column}_mean"],
                            xerr=np.nan_to_num(ref["nll_weight_std"].to_numpy(float)),
                            yerr=np.nan_to_num(ref[f"{column}_std"].to_numpy(float)),
                            marker="*", ms=9, color="C3", ls="none", label=f"{reference} (calibrated)")
            ax.set_xscale("log")
            ax.set_xlabel("NLL weight w per latent dim")
            if column != "rate_per_dim":
                ax.set_yscale("log")
        axes[0].legend(frameon=False)
    return fig


def fig_channel_stats(df: pd.DataFrame) -> Figure:
    """The Figure 4 statistics per latent channel: one panel per (latents, statistic), a dot per
    channel of each variant (fixed jitter), a bar at the channel mean.

    Args:
        df: the long table of :func:`simflow.analysis.load.channel_statistics` (``variant,
            latents, channel, statistic, value``; ``latents`` is ``mu`` or ``z``).
    """
    _require_df(df, ["variant", "latents", "statistic", "value"], "the per-channel table")
    kinds = list(dict.fromkeys(df["latents"]))
    order = list(dict.fromkeys(df["variant"].astype(str)))
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(max(8.0, 2.0 * len(order) + 2), 2.8 * len(kinds))
        axes = fig.subplots(len(kinds), len(LATENT_STAT_COLUMNS), squeeze=False)
        rng = np.random.default_rng(0)  # fixed jitter: re-running gives the same picture
        for row, kind in zip(axes, kinds, strict=True):
            for ax, stat in zip(row, LATENT_STAT_COLUMNS, strict=True):
                d = df[(df["latents"] == kind) & (df["statistic"] == stat)]
                for i, variant in enumerate(order):
                    v = d.loc[d["variant"].astype(str) == variant, "value"].to_numpy(float)
                    if v.size == 0:
                        continue
                    ax.scatter(i + rng.uniform(-0.2, 0.2, v.size), v, s=8, color=f"C{i % 10}", alpha=0.7)
                    ax.hlines(v.mean(), i - 0.3, i + 0.3, color="k", lw=1.5)
                ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=7)
                ax.set_title(f"{stat.replace('_', ' ')} ({ {'mu': 'μ'}.get(kind, kind) })", fontsize=8)
    return fig


def fig_interpolations(d: Mapping[str, np.ndarray]) -> Figure:
    """Paper Figure 3b: decoded images along a linear path between two latents.

    One row per variant, the ``K`` images of the path from left (t = 0) to right (t = 1).

    Args:
        d: variant -> uint8 array ``(K, H, W, C)``.
    """
    images = _check_images(d, "interpolations")
    strips = {name: _tile(arr, ncol=arr.shape[0]) for name, arr in images.items()}
    # Pad every strip on the right/bottom to a common canvas so that the rows stay left-aligned
    # at the same scale when variants have different K (or image sizes).
    height = max(s.shape[0] for s in strips.values())
    width = max(s.shape[1] for s in strips.values())
    for name, s in strips.items():
        canvas = np.full((height, width, s.shape[2]), 255, dtype=np.uint8)
        canvas[: s.shape[0], : s.shape[1]] = s
        strips[name] = canvas
    fig_width = min(1.0 * max(a.shape[0] for a in images.values()) + 1.2, 14.0)
    row_height = (fig_width - 1.2) * height / width
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(fig_width, row_height * len(strips) + 0.5)
        axes = fig.subplots(len(strips), 1, squeeze=False)[:, 0]
        for ax, (name, strip) in zip(axes, strips.items(), strict=True):
            _show(ax, strip)
            ax.set_ylabel(name, rotation=0, ha="right", va="center")
        axes[0].set_title("linear interpolation between two latents, t = 0 → 1")
    return fig


def _bar_panel(ax: Axes, agg: pd.DataFrame, column: str, order: list[str], colors: dict) -> bool:
    """Bars of ``<column>_mean`` ± ``<column>_std`` at fixed positions; False if none is finite."""
    mean_col, std_col = f"{column}_mean", f"{column}_std"
    if mean_col not in agg.columns:
        return False
    by_variant = agg.set_index("variant")
    drawn = False
    for i, variant in enumerate(order):
        mean = by_variant.at[variant, mean_col]
        if not np.isfinite(mean):
            continue  # e.g. a pixel-space variant has no latent statistic
        std = by_variant.at[variant, std_col]
        yerr = std if by_variant.at[variant, "n_seeds"] > 1 and np.isfinite(std) else None
        ax.bar(i, mean, yerr=yerr, capsize=3, color=colors[variant], width=0.7)
        drawn = True
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
    return drawn


def fig_latent_stats(df: pd.DataFrame) -> Figure:
    """Paper Figure 4: the four latent smoothness statistics, one bar per variant.

    Bars are the mean over seeds with a ±1 std error bar when a variant has several seeds.
    Variants with no finite statistic at all (pixel-space variants) are left out; a NaN cell
    leaves a gap.

    Args:
        df: the summary table (``variant`` and any of the four statistic columns).
    """
    _require_df(df, ["variant"], "the summary table")
    present = [c for c in LATENT_STAT_COLUMNS if c in df.columns]
    if not present:
        raise ValueError(
            "the summary table has none of the latent statistic columns "
            f"{list(LATENT_STAT_COLUMNS)}"
        )
    cols = ["variant"] + (["seed"] if "seed" in df.columns else []) + present
    agg = aggregate_seeds(_numeric(df[cols], present), by="variant")
    has_any = np.isfinite(agg[[f"{c}_mean" for c in present]].to_numpy(float)).any(axis=1)
    order = [str(v) for v in agg.loc[has_any, "variant"]]
    agg["variant"] = agg["variant"].astype(str)
    colors = _colors(order)
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(max(7.0, 0.45 * len(order) * 4 + 2), 3.2)
        axes = fig.subplots(1, len(LATENT_STAT_COLUMNS))
        for ax, column in zip(axes, LATENT_STAT_COLUMNS, strict=True):
            ax.set_title(BY_NAME[column].title)
            if not order or not _bar_panel(ax, agg, column, order, colors):
                _no_data(ax, "no data" if column in present else "not computed")
    return fig


def _floor_line(ax: Axes, value: Any, std: Any, n: Any, what: str) -> None:
    """The real-vs-real floor as a horizontal line (± its std as a band where given)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return
    if not np.isfinite(value):
        return
    label = f"real vs real ({int(n)} test images)" if n is not None and np.isfinite(float(n)) else "real vs real"
    ax.axhline(value, color="0.3", ls=":", lw=1, label=f"{what} {label}")
    try:
        std = float(std)
    except (TypeError, ValueError):
        return
    if np.isfinite(std):
        ax.axhspan(value - std, value + std, color="0.5", alpha=0.15, lw=0)


def fig_fid(df: pd.DataFrame, sweep_reference: str | None = "simflow",
            floor: Mapping[str, Any] | None = None) -> Figure:
    """Paper Figure 5: generation FID per variant, and FID against σ̄ for the σ̄ sweep.

    Left panel: gFID (and rFID beside it when present) per variant, mean ± std over seeds,
    excluding the ``sigma_sweep`` group, with the real-vs-real FID floor (``floor``, the
    fid-floor stage's JSON: real test images against the reference at the samples' count) as a
    dotted line. Middle panel (when the table has ``kid``): gKID per variant, the claims' metric,
    with the KID floor ± its std over subsets. Right panel (only when some row has a finite ``sigma``):
    gFID (and rFID) against σ̄, one point per variant with a finite ``sigma``. When a
    ``sigma_sweep`` group exists the points are that group plus ``sweep_reference`` (the default
    SimFlow run, whose σ̄ = 0.5 belongs on the same curve) unless its σ̄ is already swept;
    other variants with a σ̄ (e.g. ``simflow_repa``) change more than σ̄ and are left out.

    Args:
        df: the summary table (``variant``, ``fid``; optional ``rfid``, ``sigma``, ``group``,
            ``seed``).
        sweep_reference: the variant added to the σ̄ sweep, or None.
        floor: ``{"fid", "kid_mean", "kid_std", "num_images"}`` of the real-vs-real floor, or None.
    """
    _require_df(df, ["variant", "fid"], "the summary table")
    df = _numeric(df, ["fid", "rfid", "sigma"] + (["kid"] if "kid" in df.columns else []))
    floor = floor or {}
    group = df["group"].astype(str) if "group" in df.columns else pd.Series("", index=df.index)
    is_sweep = group == SIGMA_SWEEP
    main_rows = df[~is_sweep & (group != RATE_SWEEP)]
    main_rows = main_rows if not main_rows.empty else df
    df = df[group != RATE_SWEEP]
    is_sweep = is_sweep[df.index]
    sweep_rows = pd.DataFrame()
    if "sigma" in df.columns:
        finite_sigma = df[_finite_mask(df["sigma"])]
        if is_sweep.any():
            in_sweep = is_sweep[finite_sigma.index]
            ref = finite_sigma["variant"].astype(str) == str(sweep_reference)
            swept = set(finite_sigma.loc[in_sweep, "sigma"])
            ref &= ~finite_sigma["sigma"].isin(swept)
            sweep_rows = finite_sigma[in_sweep | ref]
        else:
            sweep_rows = finite_sigma
    metrics = [m for m in ("fid", "rfid") if m in df.columns and _finite_mask(df[m]).any()]
    labels = {"fid": "gFID", "rfid": "rFID"}

    has_kid = "kid" in df.columns and _finite_mask(df["kid"]).any()

    with matplotlib.rc_context(_STYLE_RC):
        n_panels = 1 + int(has_kid) + int(not sweep_rows.empty)
        agg = aggregate_seeds(main_rows, by="variant")
        agg["variant"] = agg["variant"].astype(str)
        order = [v for v, m in zip(agg["variant"], agg["fid_mean"], strict=True) if np.isfinite(m)]
        bar_width = max(4.0, 0.5 * len(order) + 1.5)
        fig = _new_figure(bar_width * (1 + int(has_kid)) + 3.5 * int(not sweep_rows.empty), 3.2)
        axes = fig.subplots(1, n_panels, squeeze=False)[0]

        ax = axes[0]
        ax.set_title("FID per variant (lower is better)")
        if not order:
            _no_data(ax)
        else:
            by_variant = agg.set_index("variant")
            width = 0.8 / len(metrics)
            for j, m in enumerate(metrics):
                x = np.arange(len(order)) + (j - (len(metrics) - 1) / 2) * width
                mean = by_variant.loc[order, f"{m}_mean"].to_numpy(float)
                std = by_variant.loc[order, f"{m}_std"].to_numpy(float)
                multi = by_variant.loc[order, "n_seeds"].to_numpy() > 1
                yerr = np.where(multi & np.isfinite(std), std, 0.0)
                ok = np.isfinite(mean)
                ax.bar(
                    x[ok],
                    mean[ok],
                    width=width,
                    yerr=yerr[ok],
                    capsize=2,
                    label=labels[m],
                    color=f"C{j}",
                    hatch=None if m == "fid" else "//",
                )
            ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
            ax.set_ylabel("FID")
            _floor_line(ax, floor.get("fid"), None, floor.get("num_images"), "gFID")
            ax.legend(frameon=False)

        if has_kid:
            ax = axes[1]
            ax.set_title("KID per variant (the claims' metric)")
            by_variant = agg.set_index("variant")
            kid_order = [v for v in order if np.isfinite(by_variant.loc[v, "kid_mean"])]
            if not kid_order:
                _no_data(ax)
            else:
                mean = by_variant.loc[kid_order, "kid_mean"].to_numpy(float)
                std = by_variant.loc[kid_order, "kid_std"].to_numpy(float)
                multi = by_variant.loc[kid_order, "n_seeds"].to_numpy() > 1
                ax.bar(np.arange(len(kid_order)), mean, width=0.6, capsize=2, color="C2", label="gKID",
                       yerr=np.where(multi & np.isfinite(std), std, 0.0))
                ax.set_xticks(range(len(kid_order)), kid_order, rotation=45, ha="right")
                ax.set_ylabel("KID")
                _floor_line(ax, floor.get("kid_mean"), floor.get("kid_std"), floor.get("num_images"), "KID")
                ax.legend(frameon=False)

        if not sweep_rows.empty:
            ax = axes[-1]
            ax.set_title(r"$\bar{\sigma}$ sweep")
            sagg = aggregate_seeds(sweep_rows, by="variant").sort_values("sigma_mean")
            drawn = False
            for j, m in enumerate(metrics):
                rows = sagg[np.isfinite(sagg[f"{m}_mean"].to_numpy(float))]
                if rows.empty:
                    continue
                yerr = np.where(
                    (rows["n_seeds"] > 1) & np.isfinite(rows[f"{m}_std"]), rows[f"{m}_std"], 0.0
                )
                ax.errorbar(
                    rows["sigma_mean"],
                    rows[f"{m}_mean"],
                    yerr=yerr,
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=f"C{j}",
                    label=labels[m],
                    ls="-" if m == "fid" else "--",
                )
                drawn = True
            if drawn:
                ax.set_xlabel(r"posterior std $\bar{\sigma}$")
                ax.set_ylabel("FID")
                ax.legend(frameon=False)
            else:
                _no_data(ax)
    return fig


def fig_training_curves(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> Figure:
    """Training curves: one panel per metric, one line per variant (mean over seeds).

    Args:
        df: columns ``variant, step, metric, value`` (+ ``seed``).
        metrics: the metrics to plot, in panel order; default all, in order of appearance.
    """
    _require_df(df, ["variant", "step", "metric", "value"], "the training-curve table")
    available = list(dict.fromkeys(df["metric"].astype(str)))
    if metrics is None:
        metrics = available
    else:
        metrics = [str(m) for m in metrics]
        unknown = [m for m in metrics if m not in available]
        if unknown or not metrics:
            raise ValueError(f"unknown metric(s) {unknown or metrics}; available: {available}")
    colors = _colors(list(df["variant"].astype(str)))
    ncol = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncol)
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(3.2 * ncol, 2.6 * nrows)
        axes = fig.subplots(nrows, ncol, squeeze=False).ravel()
        for ax in axes[len(metrics) :]:
            ax.set_axis_off()
        for ax, metric in zip(axes, metrics, strict=False):
            rows = df[df["metric"].astype(str) == metric].assign(
                variant=lambda x: x["variant"].astype(str)
            )
            stats = _mean_std_by(rows, ["variant", "step"], "value")
            ax.set_title(metric)
            if stats.empty:
                _no_data(ax)
                continue
            for variant, r in stats.groupby("variant", sort=False):
                r = r.sort_values("step")
                x, y, s = (
                    r["step"].to_numpy(float),
                    r["mean"].to_numpy(float),
                    r["std"].to_numpy(float),
                )
                ax.plot(x, y, color=colors[variant], label=variant, lw=1)
                if np.isfinite(s).any():
                    s = np.nan_to_num(s)
                    ax.fill_between(x, y - s, y + s, color=colors[variant], alpha=0.2, lw=0)
            ax.set_xlabel("step")
        handles, labels = [], []
        for ax in axes[: len(metrics)]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            fig.legend(handles, labels, loc="outside right upper", frameon=False)
    return fig


def fig_sample_grids(d: Mapping[str, np.ndarray], nrow: int = 8) -> Figure:
    """Generated samples: one panel per variant, each a grid with ``nrow`` images per row.

    (``nrow`` follows ``torchvision.utils.make_grid``: the number of images in each row.)

    Args:
        d: variant -> uint8 array ``(N, H, W, C)``.
        nrow: images per grid row, >= 1.
    """
    images = _check_images(d, "sample grids")
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 1:
        raise ValueError(f"nrow (images per grid row) must be an integer >= 1, got {nrow!r}")
    grids = {name: _tile(arr, ncol=nrow) for name, arr in images.items()}
    ncol = min(3, len(grids))
    nrows = math.ceil(len(grids) / ncol)
    # Size each panel from the aspect ratio of the largest grid.
    aspect = max(g.shape[0] / g.shape[1] for g in grids.values())
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(3.3 * ncol, (3.3 * aspect + 0.3) * nrows)
        axes = fig.subplots(nrows, ncol, squeeze=False).ravel()
        for ax in axes[len(grids) :]:
            ax.set_axis_off()
        for ax, (name, grid) in zip(axes, grids.items(), strict=False):
            _show(ax, grid)
            ax.set_title(name)
    return fig


def fig_guidance_sweep(weights: Sequence[float], fids: Sequence[float], images: np.ndarray,
                       title: str = "", ncol: int = 10) -> Figure:
    """The CFG sweep of one model (TarFlow's guided-samples figure): a row of samples per weight,
    the same prior noise and labels in every row, beside gFID against the weight.

    Args:
        weights, fids: the sweep's CFG weights and their gFIDs (same length).
        images: uint8 ``(len(weights), K, H, W, C)``, the same K samples at every weight.
        title: the model's name.
        ncol: images per grid row (10: one column per class of a class-balanced set).
    """
    if len(weights) != len(fids) or len(weights) != len(images):
        raise ValueError(f"guidance sweep: {len(weights)} weights, {len(fids)} gFIDs and "
                         f"{len(images)} image sets must have the same length")
    sets = _check_images({f"w={w:g}": arr for w, arr in zip(weights, images)}, "guidance samples")
    grids = [_tile(arr, ncol=ncol) for arr in sets.values()]
    aspect = grids[0].shape[0] / grids[0].shape[1]
    with matplotlib.rc_context(_STYLE_RC):
        fig = _new_figure(8.0, max(2.5, 3.4 * aspect * len(grids) + 0.4))
        left, right = fig.subfigures(1, 2, width_ratios=[2.2, 1.0])
        axes = left.subplots(len(grids), 1, squeeze=False).ravel()
        for ax, (name, grid) in zip(axes, zip(sets, grids)):
            _show(ax, grid)
            ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax = right.subplots()
        ax.plot(list(weights), list(fids), marker="o", color="C0")
        ax.set_xlabel("CFG weight w")
        ax.set_ylabel("gFID")
        ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
    return fig
