"""Smoothness statistics of VAE latent maps (the four metrics of the paper's Figure 4).

The paper names the four metrics but its exact definitions were not retrievable (see
docs/sources.md), so the definitions below are **ours**. They are chosen
so that each metric is invariant to the latent scale and to a per-map offset: a VAE can rescale
its latents freely, and a smoothness measure must not reward that.

Every function takes latent maps ``z`` of shape ``(N, C, H, W)`` (a NumPy array or a torch
tensor; ``N`` images, ``C`` channels, an ``H x W`` token grid) and returns one float: the mean of
the per-map value over all ``N * C`` maps. A map is one channel of one image, ``z[n, c]``.

Conventions shared by all four metrics:

* All arithmetic is done in float64 NumPy, vectorised over maps.
* **Constant maps are skipped.** A map is constant when its population standard deviation over
  ``(H, W)`` is zero up to float64 rounding, i.e. ``std <= 1e-10 * max|z[n, c]|`` (a relative
  test, so that it does not depend on the latent scale). Such a map has no spatial structure and
  every metric below would be 0/0 on it. If every map is constant a ``ValueError`` is raised.
* Inputs must be 4-D, finite, with ``H >= 2`` and ``W >= 2``; anything else raises
  ``ValueError``.

Expected values on reference signals (tested in ``tests/test_latent_stats.py``):

* Gaussian white noise: spectral entropy ``~ 1 - (1 - gamma) / ln(HW - 1)`` (0.924 on 16x16:
  the periodogram of white noise is exponentially distributed, not flat, so the entropy of a
  finite sample stays below 1 and approaches it only logarithmically in ``HW``); high-frequency
  ratio ~ the fraction of non-DC frequency bins with radius above the cutoff; total variation
  ``~ E|X - Y| / sigma = 2 / sqrt(pi) ~ 1.128``; autocorrelation ~ 0.
* Checkerboard ``(-1)^(h + w)``: spectral entropy 0 (one bin), high-frequency ratio 1, total
  variation 2, autocorrelation -1.
* Ramp ``a*h + b*w``: autocorrelation exactly 1 (each lag-shifted slice is the other plus a
  constant), total variation ``(|a| + |b|) / 2 / sqrt(a^2 (H^2 - 1)/12 + b^2 (W^2 - 1)/12)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LATENT_STAT_COLUMNS",
    "LatentStatistic",
    "STATISTICS",
    "spectral_entropy",
    "high_frequency_ratio",
    "total_variation",
    "autocorrelation",
    "latent_statistics",
]

# A map (or a lag-shifted slice) whose std is below this fraction of its largest magnitude is
# treated as constant: float64 rounding of a truly constant map leaves a std of ~1e-16 of it.
_CONSTANT_RTOL = 1e-10


def _as_maps(z: Any) -> np.ndarray:
    """Validate ``z`` and return it as a float64 array of shape ``(N * C, H, W)``."""
    if hasattr(z, "detach") and hasattr(z, "cpu"):
        # A torch tensor: go through float64 in torch first, since bfloat16 has no NumPy dtype.
        # lazy: torch (~2 CPU-s) is not loaded by the analysis of NumPy arrays
        import torch

        z = z.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(z)
    if arr.ndim != 4:
        raise ValueError(
            f"latent maps must have shape (N, C, H, W), got an array with shape {arr.shape}; "
            "add the missing batch/channel axes (e.g. z[None] or z[:, None])"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"latent maps must be real numbers, got dtype {arr.dtype}")
    n, c, h, w = arr.shape
    if h < 2 or w < 2:
        raise ValueError(f"latent maps need H >= 2 and W >= 2 to have neighbours, got H={h}, W={w}")
    if n * c == 0:
        raise ValueError(f"latent maps are empty (shape {arr.shape}); pass at least one map")
    arr = arr.astype(np.float64, copy=False).reshape(n * c, h, w)
    if not np.all(np.isfinite(arr)):
        raise ValueError("latent maps contain NaN or inf values; clean or drop those maps first")
    return arr


def _is_constant(std: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """True where ``std`` is zero up to float64 rounding relative to ``scale`` (both shape (M,))."""
    return std <= _CONSTANT_RTOL * scale


def _nonconstant_centred(z: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(maps, std)``: the non-constant maps with their spatial mean removed, shape
    ``(M, H, W)``, and their population std over ``(H, W)``, shape ``(M,)``."""
    maps = _as_maps(z)
    std = maps.std(axis=(1, 2))
    scale = np.abs(maps).max(axis=(1, 2))
    keep = ~_is_constant(std, scale)
    if not keep.any():
        raise ValueError(
            f"all {maps.shape[0]} latent maps are constant (zero std over H x W): there is no "
            "spatial structure to measure; check that the encoder output is not collapsed"
        )
    maps = maps[keep]
    return maps - maps.mean(axis=(1, 2), keepdims=True), std[keep]


def _power_spectrum(centred: np.ndarray) -> np.ndarray:
    """|FFT2|^2 of each map, shape ``(M, H, W)`` (DC at index [0, 0], NumPy's layout)."""
    spec = np.fft.fft2(centred, axes=(1, 2))
    return spec.real**2 + spec.imag**2


def spectral_entropy(z: Any) -> float:
    """Normalised Shannon entropy of the spatial power spectrum, averaged over maps.

    Per map ``x`` (shape ``(H, W)``): subtract its spatial mean, ``P = |FFT2(x)|^2``, drop the DC
    bin, ``p = P / sum(P)``, and ``H = -sum(p ln p) / ln(H*W - 1)`` with ``0 ln 0 = 0``.

    Range ``[0, 1]``: 1 for a perfectly flat spectrum (every non-DC bin carries the same power),
    0 when all power sits in one bin. Higher = more white-noise-like = less smooth. A single real
    sinusoid occupies two conjugate bins and gives ``ln 2 / ln(H*W - 1)``.

    Args:
        z: latent maps, shape ``(N, C, H, W)``, NumPy array or torch tensor.

    Returns:
        The mean over non-constant maps (dimensionless).
    """
    centred, _ = _nonconstant_centred(z)
    m, h, w = centred.shape
    power = _power_spectrum(centred).reshape(m, h * w)[:, 1:]  # flat index 0 is the DC bin
    p = power / power.sum(axis=1, keepdims=True)
    # 0 ln 0 = 0: evaluate the log only where p > 0.
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(axis=1) / np.log(h * w - 1)
    return float(np.clip(entropy, 0.0, 1.0).mean())


def _radial_frequency(h: int, w: int) -> np.ndarray:
    """Radius ``sqrt(fy^2 + fx^2)`` of each FFT bin in cycles per token, shape ``(H, W)``."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy**2 + fx**2)


def high_frequency_ratio(z: Any, cutoff: float = 0.25) -> float:
    """Fraction of the (non-DC) spectral power above a radial frequency, averaged over maps.

    Per map (spatial mean subtracted), ``P = |FFT2|^2``; the frequency of each bin comes from
    ``np.fft.fftfreq`` along each axis in cycles per token (so the Nyquist frequency is 0.5) and
    its radius is ``r = sqrt(fx^2 + fy^2)``. The ratio is ``sum_{r > cutoff} P / sum_{r > 0} P``.

    Range ``[0, 1]``; lower = smoother. The default cutoff 0.25 is half the Nyquist frequency.
    For white noise the expected ratio is about the fraction of non-DC bins with ``r > cutoff``.

    Args:
        z: latent maps, shape ``(N, C, H, W)``, NumPy array or torch tensor.
        cutoff: radial frequency in cycles per token, ``>= 0``.

    Returns:
        The mean over non-constant maps (dimensionless).
    """
    if not np.isfinite(cutoff) or cutoff < 0:
        raise ValueError(f"cutoff must be a finite frequency >= 0 cycles/token, got {cutoff}")
    centred, _ = _nonconstant_centred(z)
    _, h, w = centred.shape
    power = _power_spectrum(centred)
    radius = _radial_frequency(h, w)
    high = power[:, radius > cutoff].sum(axis=1)
    # The map is centred and non-constant, so the non-DC power is > 0 (Parseval).
    total = power[:, radius > 0].sum(axis=1)
    return float(np.clip(high / total, 0.0, 1.0).mean())


def total_variation(z: Any) -> float:
    """Scale-free anisotropic total variation between neighbouring tokens, averaged over maps.

    Per map ``x``: ``(mean|x[h+1, w] - x[h, w]| + mean|x[h, w+1] - x[h, w]|) / 2``, divided by the
    map's population std over ``(H, W)`` so that the latent scale cancels.

    Lower = smoother. Gaussian white noise gives ``2 / sqrt(pi) ~ 1.128``; a checkerboard 2.

    Args:
        z: latent maps, shape ``(N, C, H, W)``, NumPy array or torch tensor.

    Returns:
        The mean over non-constant maps (dimensionless).
    """
    centred, std = _nonconstant_centred(z)
    vertical = np.abs(np.diff(centred, axis=1)).mean(axis=(1, 2))
    horizontal = np.abs(np.diff(centred, axis=2)).mean(axis=(1, 2))
    return float(((vertical + horizontal) / 2.0 / std).mean())


def _pearson_rows(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (both shape (M, K)).

    ``scale`` (shape (M,)) is the magnitude of each row's map, used to decide when a row is
    constant up to rounding. Returns shape ``(M,)`` with NaN where either row is constant, since
    the correlation is undefined there.
    """
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    sa = np.sqrt((a**2).mean(axis=1))
    sb = np.sqrt((b**2).mean(axis=1))
    defined = ~(_is_constant(sa, scale) | _is_constant(sb, scale))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).mean(axis=1) / (sa * sb)
    return np.where(defined, np.clip(r, -1.0, 1.0), np.nan)


def autocorrelation(z: Any, lag: int = 1) -> float:
    """Spatial autocorrelation between tokens ``lag`` apart, averaged over maps.

    Per map ``x`` of shape ``(H, W)``: the Pearson correlation between ``x[:H-lag, :]`` and
    ``x[lag:, :]`` (vertical) and between ``x[:, :W-lag]`` and ``x[:, lag:]`` (horizontal), each
    computed over all pairs of the two slices pooled, and averaged over the two directions.

    **A direction whose correlation is undefined is skipped**: when either of its two slices is
    constant (e.g. a map that is zero except for its last row has a constant ``x[:H-1, :]``), the
    map's value is the other direction alone; a map with neither direction defined is skipped; if
    no map has a defined direction a ``ValueError`` is raised. Note that a pure ramp
    ``x = a*h`` is *not* such a case: its horizontal slices are identical non-constant arrays,
    so both directions give exactly 1.

    Range ``[-1, 1]``; higher = smoother. White noise ~ 0, a checkerboard -1.

    Args:
        z: latent maps, shape ``(N, C, H, W)``, NumPy array or torch tensor.
        lag: neighbour distance in tokens, an integer with ``1 <= lag < min(H, W)``.

    Returns:
        The mean over maps with at least one defined direction (dimensionless).
    """
    centred, _ = _nonconstant_centred(z)
    m, h, w = centred.shape
    if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or not 1 <= lag < min(h, w):
        raise ValueError(
            f"lag must be an integer with 1 <= lag < min(H, W) = {min(h, w)}, got {lag!r}"
        )
    scale = np.abs(centred).max(axis=(1, 2))
    vertical = _pearson_rows(
        centred[:, : h - lag, :].reshape(m, -1), centred[:, lag:, :].reshape(m, -1), scale
    )
    horizontal = _pearson_rows(
        centred[:, :, : w - lag].reshape(m, -1), centred[:, :, lag:].reshape(m, -1), scale
    )
    both = np.stack([vertical, horizontal], axis=1)
    n_defined = np.isfinite(both).sum(axis=1)
    if not n_defined.any():
        raise ValueError(
            f"the lag-{lag} autocorrelation is undefined for every map: in each map, both the "
            "vertical and the horizontal pair of shifted slices contain a constant slice"
        )
    per_map = np.nansum(both, axis=1)[n_defined > 0] / n_defined[n_defined > 0]
    return float(per_map.mean())


@dataclass(frozen=True)
class LatentStatistic:
    """One smoothness statistic of latent maps: the one registry that the latents stage, the
    summary table, the claims, the figures and the notebooks read.

    ``name``: its column in the tables; ``compute``: maps ``(N, C, H, W)`` → a float (the mean over
    the non-constant maps); ``smoother``: ``"lower"`` or ``"higher"``, the direction of a smoother
    latent; ``label``: the table's column header; ``title``: the figure panel's title; ``unit``.
    """

    name: str
    compute: Callable[[Any], float]
    smoother: str
    label: str
    title: str
    unit: str

    @property
    def sign(self) -> int:
        """+1 when a larger value is smoother, −1 when a smaller one is."""
        return 1 if self.smoother == "higher" else -1


#: The statistics, in table and figure order (default parameters: ``cutoff=0.25`` cycles/token,
#: ``lag=1`` token).
STATISTICS: tuple[LatentStatistic, ...] = (
    LatentStatistic("spectral_entropy", spectral_entropy, "lower", "spectral entropy",
                    "Spectral entropy\n(lower = smoother)", "normalised entropy, 0–1"),
    LatentStatistic("high_frequency_ratio", high_frequency_ratio, "lower", "HF ratio",
                    "High-frequency ratio, r > 0.25\n(lower = smoother)", "fraction of power"),
    LatentStatistic("total_variation", total_variation, "lower", "TV",
                    "Total variation / std\n(lower = smoother)", "per token, in map stds"),
    LatentStatistic("autocorrelation", autocorrelation, "higher", "autocorr.",
                    "Autocorrelation, lag 1\n(higher = smoother)", "correlation, −1–1"),
)
LATENT_STAT_COLUMNS: tuple[str, ...] = tuple(s.name for s in STATISTICS)
BY_NAME: dict[str, LatentStatistic] = {s.name: s for s in STATISTICS}


def latent_statistics(z: Any) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` of latent maps ``z`` (shape ``(N, C, H, W)``), by
    name, each a mean over the non-constant maps."""
    # Convert once (a torch tensor on the GPU would otherwise be copied once per statistic).
    z4 = _as_maps(z)[:, None]
    return {s.name: s.compute(z4) for s in STATISTICS}
