"""Known-answer tests for simflow.analysis.latent_stats (white noise, ramps, sinusoids,
checkerboards), plus invariances, torch input and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simflow.analysis.latent_stats import (
    autocorrelation,
    high_frequency_ratio,
    latent_statistics,
    spectral_entropy,
    total_variation,
)

H = W = 16


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """Gaussian white noise, 64 images x 8 channels of 16x16 (512 maps)."""
    return np.random.default_rng(0).standard_normal((64, 8, H, W))


def grid(h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )


def as4d(x: np.ndarray) -> np.ndarray:
    return x[None, None]


def checkerboard(h: int = H, w: int = W) -> np.ndarray:
    hh, ww = grid(h, w)
    return as4d((-1.0) ** (hh + ww))


# --- white noise ------------------------------------------------------------------------------


def test_white_noise_spectral_entropy(noise):
    # The periodogram of white noise has i.i.d. exponential bins, so the expected entropy of the
    # normalised spectrum is ln(n) - (1 - Euler's gamma) nats for n bins: 0.924 on 16x16, < 1.
    expected = 1.0 - (1.0 - np.euler_gamma) / math.log(H * W - 1)
    assert spectral_entropy(noise) == pytest.approx(expected, abs=0.005)
    # Larger grids come closer to a flat spectrum.
    big = np.random.default_rng(1).standard_normal((8, 2, 64, 64))
    assert spectral_entropy(big) == pytest.approx(
        1.0 - (1.0 - np.euler_gamma) / math.log(4095), abs=0.005
    )
    assert spectral_entropy(big) > spectral_entropy(noise)


def test_white_noise_high_frequency_ratio_matches_bin_fraction(noise):
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.fftfreq(W)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    fraction = (r > 0.25).sum() / (r > 0).sum()
    assert high_frequency_ratio(noise) == pytest.approx(fraction, rel=0.03)
    # A different cutoff changes the answer accordingly.
    fraction_01 = (r > 0.1).sum() / (r > 0).sum()
    assert high_frequency_ratio(noise, cutoff=0.1) == pytest.approx(fraction_01, rel=0.03)


def test_white_noise_total_variation_and_autocorrelation(noise):
    # E|X - Y| = 2 sigma / sqrt(pi) for X, Y ~ N(0, sigma^2) i.i.d.
    assert total_variation(noise) == pytest.approx(2.0 / math.sqrt(math.pi), rel=0.02)
    assert abs(autocorrelation(noise)) < 0.02


def test_smooth_field_is_smoother_than_noise(noise):
    # Blurred noise: every metric must move in its documented "smoother" direction.
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(noise, sigma=(0, 0, 2, 2), mode="wrap")
    assert spectral_entropy(smooth) < spectral_entropy(noise)
    assert high_frequency_ratio(smooth) < high_frequency_ratio(noise)
    assert total_variation(smooth) < total_variation(noise)
    assert autocorrelation(smooth) > autocorrelation(noise) + 0.5


# --- deterministic patterns --------------------------------------------------------------------


def test_checkerboard():
    z = checkerboard()
    assert total_variation(z) == pytest.approx(2.0, abs=1e-12)
    assert autocorrelation(z) == pytest.approx(-1.0, abs=1e-12)
    assert high_frequency_ratio(z) == pytest.approx(1.0, abs=1e-12)
    # All power in the single Nyquist bin (0.5, 0.5): entropy 0.
    assert spectral_entropy(z) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.0, 2.5), (0.7, -1.3)])
def test_ramp(a, b):
    hh, ww = grid()
    z = as4d(a * hh + b * ww)
    # Each lag-shifted slice is the other plus a constant: correlation exactly 1 wherever defined.
    assert autocorrelation(z) == pytest.approx(1.0, abs=1e-12)
    std = math.sqrt(a**2 * (H**2 - 1) / 12 + b**2 * (W**2 - 1) / 12)
    assert total_variation(z) == pytest.approx((abs(a) + abs(b)) / 2 / std, rel=1e-12)


def test_autocorrelation_skips_direction_with_constant_slice():
    # Zero except the last row: x[:H-1, :] is constant, so the vertical correlation is undefined
    # and skipped; the horizontal slices are identical and non-constant -> correlation 1.
    x = np.zeros((H, W))
    x[-1, :] = 1.0
    assert autocorrelation(as4d(x)) == pytest.approx(1.0, abs=1e-12)
    # Same map mixed with a checkerboard map (-1): the result is the mean over maps (1 + -1)/2,
    # which shows the skipped direction does not count as a value.
    z = np.concatenate([as4d(x), checkerboard()], axis=1)
    assert autocorrelation(z) == pytest.approx(0.0, abs=1e-12)
    # Had the undefined direction been counted as 0, the first map would score 0.5, not 1.


def test_autocorrelation_all_directions_undefined_raises():
    x = np.zeros((2, 2))
    x[0, 0] = 1.0  # every shifted pair contains an all-zero slice
    with pytest.raises(ValueError, match="undefined for every map"):
        autocorrelation(as4d(x))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_vertical_sinusoid(k):
    hh, _ = grid()
    z = as4d(np.cos(2 * np.pi * k * hh / H))
    # Two conjugate bins with equal power.
    assert spectral_entropy(z) == pytest.approx(math.log(2) / math.log(H * W - 1), abs=1e-9)
    expected_hf = 1.0 if k / H > 0.25 else 0.0
    assert high_frequency_ratio(z) == pytest.approx(expected_hf, abs=1e-12)
    # Horizontal slices are identical (correlation 1); the vertical one is the plain Pearson
    # correlation of the two row-shifted slices, computed independently with np.corrcoef.
    x = z[0, 0]
    vertical = np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]
    assert autocorrelation(z) == pytest.approx((vertical + 1.0) / 2.0, abs=1e-12)


def test_sinusoid_cutoff_boundary():
    # k/H = 0.25 exactly is *not* above the cutoff 0.25 (strict inequality).
    hh, _ = grid()
    z = as4d(np.sin(2 * np.pi * 4 * hh / H))
    assert high_frequency_ratio(z, cutoff=0.25) == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_ratio(z, cutoff=0.24) == pytest.approx(1.0, abs=1e-12)


# --- invariances and input handling --------------------------------------------------------------


def test_invariant_to_positive_scale_and_per_map_offset(noise):
    z = noise[:8]
    rng = np.random.default_rng(2)
    scale = 7.3
    offsets = rng.normal(0, 50, size=(8, 8, 1, 1))
    base = latent_statistics(z)
    moved = latent_statistics(scale * z + offsets)
    for key in base:
        assert moved[key] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key


def test_torch_matches_numpy(noise):
    torch = pytest.importorskip("torch")
    z = noise[:4].astype(np.float32)
    expected = latent_statistics(z)
    got = latent_statistics(torch.from_numpy(z))
    assert got == pytest.approx(expected, rel=1e-12)
    # bfloat16 has no NumPy dtype; it must still work (values differ only by its rounding).
    got_bf16 = latent_statistics(torch.from_numpy(z).to(torch.bfloat16))
    assert got_bf16["total_variation"] == pytest.approx(expected["total_variation"], rel=0.02)


def test_constant_maps_are_skipped():
    hh, ww = grid()
    ramp = hh + 0.5 * ww
    z = np.stack([ramp, np.full((H, W), 3.7), checkerboard()[0, 0], np.zeros((H, W))])[None]
    z_live = np.stack([ramp, checkerboard()[0, 0]])[None]
    assert latent_statistics(z) == pytest.approx(latent_statistics(z_live), rel=1e-12)
    # float32 constant map (rounding in the mean must not make it look non-constant)
    z32 = np.concatenate([z_live, np.full((1, 1, H, W), 0.1, dtype=np.float32)], axis=1)
    assert total_variation(z32) == pytest.approx(total_variation(z_live), rel=1e-12)


def test_latent_statistics_keys(noise):
    stats = latent_statistics(noise[:2])
    assert list(stats) == [
        "spectral_entropy",
        "high_frequency_ratio",
        "total_variation",
        "autocorrelation",
    ]
    assert stats["total_variation"] == pytest.approx(total_variation(noise[:2]))
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize(
    "z,match",
    [
        (np.zeros((4, 16, 16)), r"\(N, C, H, W\)"),
        (np.zeros((1, 1, 1, 1, 16)), r"\(N, C, H, W\)"),
        (np.full((2, 3, 8, 8), 1.5), "all 6 latent maps are constant"),
        (np.ones((1, 1, 1, 8)), "H >= 2 and W >= 2"),
        (np.ones((1, 1, 8, 1)), "H >= 2 and W >= 2"),
        (np.zeros((0, 1, 8, 8)), "empty"),
        (np.full((1, 1, 4, 4), np.nan), "NaN"),
    ],
)
def test_bad_input_raises(z, match):
    for fn in (spectral_entropy, high_frequency_ratio, total_variation, autocorrelation):
        with pytest.raises(ValueError, match=match):
            fn(z)


def test_bad_parameters_raise(noise):
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_ratio(noise[:1], cutoff=-0.1)
    with pytest.raises(ValueError, match="lag"):
        autocorrelation(noise[:1], lag=16)
    with pytest.raises(ValueError, match="lag"):
        autocorrelation(noise[:1], lag=0)
