"""Tests of simflow.vae: shapes, the three posterior modes, gradients and the KL formula."""

from __future__ import annotations

import math

import pytest
import torch

from simflow.vae import POSTERIOR_MODES, DiagonalGaussian, VAE


def small_vae(levels: int = 3, **kw) -> VAE:
    """A tiny VAE (base width 8) with ``levels`` resolution levels (downsampling 2**(levels-1))."""
    kw.setdefault("latent_channels", 4)
    return VAE(in_channels=3, base_channels=8, channel_mult=(1,) * levels, num_res_blocks=1, **kw)


@pytest.mark.parametrize("levels, factor", [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)])
def test_shapes_for_every_downsampling_factor(levels: int, factor: int) -> None:
    torch.manual_seed(0)
    vae = small_vae(levels, latent_channels=6)
    assert vae.downsample_factor == factor
    images = torch.randn(2, 3, 32, 32)
    recon, posterior, latents = vae(images)
    assert latents.shape == (2, 6, 32 // factor, 32 // factor)
    assert posterior.mean.shape == latents.shape
    assert recon.shape == images.shape
    assert vae.latent_shape(32) == (6, 32 // factor, 32 // factor)
    assert vae.decode(latents).shape == images.shape


@pytest.mark.parametrize("posterior", POSTERIOR_MODES)
def test_attention_levels_and_modes_run(posterior: str) -> None:
    torch.manual_seed(0)
    vae = small_vae(3, posterior=posterior, attn_resolutions=(8,), resolution=16)
    # resolution 16 with 3 levels: level sizes 16, 8, 4 -> attention on level 1 only.
    n_attn = sum(type(m).__name__ == "AttnBlock" for m in vae.encoder.down.modules())
    assert n_attn == 1
    recon, _, latents = vae(torch.randn(2, 3, 16, 16))
    assert recon.shape == (2, 3, 16, 16) and latents.shape == (2, 4, 4, 4)


def test_attention_resolution_must_be_reachable() -> None:
    with pytest.raises(ValueError, match=r"never reached.*\[16, 8, 4\]"):
        small_vae(3, attn_resolutions=(2,), resolution=16)
    with pytest.raises(ValueError, match="resolution="):
        small_vae(3, attn_resolutions=(8,))


def test_fixed_std_is_exactly_constant() -> None:
    torch.manual_seed(0)
    vae = small_vae(2, posterior="fixed", fixed_std=0.5)
    for batch in (1, 3, 5):
        images = torch.randn(batch, 3, 16, 16) * torch.rand(()) * 4
        post = vae.encode(images)
        assert torch.equal(post.std, torch.full_like(post.mean, 0.5))
    # Not a parameter: the encoder output width is C (mean only) and std has no grad.
    assert vae.encoder.conv_out.out_channels == vae.latent_channels
    assert not post.std.requires_grad
    # A different sigma_bar is honoured exactly too.
    post = small_vae(2, fixed_std=0.25).encode(torch.randn(2, 3, 16, 16))
    assert torch.equal(post.std, torch.full_like(post.mean, 0.25))


@pytest.mark.parametrize("posterior", POSTERIOR_MODES)
def test_gradient_flows_from_sample_into_encoder(posterior: str) -> None:
    torch.manual_seed(0)
    vae = small_vae(2, posterior=posterior)
    post = vae.encode(torch.randn(2, 3, 16, 16))
    x = post.sample(torch.Generator().manual_seed(1))
    x.pow(2).sum().backward()
    grad = vae.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if posterior != "fixed":
        # The log-variance half of the quant conv gets gradient through std = exp(logvar / 2).
        c = vae.latent_channels
        assert vae.quant_conv.weight.grad[c:].abs().sum() > 0


@pytest.mark.parametrize("posterior", ["learnable", "layernorm"])
def test_learned_modes_have_input_dependent_std(posterior: str) -> None:
    torch.manual_seed(0)
    vae = small_vae(2, posterior=posterior)
    post_a = vae.encode(torch.randn(1, 3, 16, 16))
    post_b = vae.encode(torch.randn(1, 3, 16, 16) * 3)
    assert not torch.allclose(post_a.std, post_b.std)
    assert (post_a.logvar >= -30).all() and (post_a.logvar <= 20).all()


def test_logvar_is_clamped() -> None:
    vae = small_vae(2, posterior="learnable", logvar_init=100.0)
    post = vae.encode(torch.randn(2, 3, 16, 16))
    assert post.logvar.max().item() == pytest.approx(20.0)


def test_logvar_init_sets_initial_std_scale() -> None:
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    low = small_vae(2, posterior="learnable", logvar_init=-8.0).encode(images).logvar
    torch.manual_seed(0)
    high = small_vae(2, posterior="learnable", logvar_init=0.0).encode(images).logvar
    # Same weights, so the log-variance differs by exactly the bias offset everywhere.
    torch.testing.assert_close(high - low, torch.full_like(low, 8.0), atol=1e-4, rtol=0)


def test_layernorm_mean_is_normalised_over_channels() -> None:
    torch.manual_seed(0)
    vae = small_vae(2, posterior="layernorm", latent_channels=8)
    mean = vae.encode(torch.randn(3, 3, 16, 16) * 5 + 2).mean
    torch.testing.assert_close(mean.mean(dim=1), torch.zeros_like(mean[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        mean.var(dim=1, unbiased=False), torch.ones_like(mean[:, 0]), atol=1e-3, rtol=0
    )


def test_kl_entropy_logprob_match_closed_form() -> None:
    mean = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    std = torch.tensor([[[[0.5, 1.0]], [[2.0, 0.1]]]])
    post = DiagonalGaussian(mean, std)
    mu, s = mean.flatten().tolist(), std.flatten().tolist()
    kl = sum(0.5 * (m * m + v * v - 1 - math.log(v * v)) for m, v in zip(mu, s))
    ent = sum(0.5 * math.log(2 * math.pi * math.e * v * v) for v in s)
    assert post.kl().shape == (1,)
    assert post.kl().item() == pytest.approx(kl, rel=1e-6)
    assert post.entropy().item() == pytest.approx(ent, rel=1e-6)
    # log q at the mean is -(entropy) + D/2 (the quadratic term's expectation is D/2).
    assert post.log_prob(mean).item() == pytest.approx(-ent + 0.5 * len(mu), rel=1e-6)
    # Same numbers when built from the log-variance, and with a broadcast scalar std.
    post_lv = DiagonalGaussian(mean, logvar=2 * torch.log(std))
    assert post_lv.kl().item() == pytest.approx(kl, rel=1e-5)
    post_bc = DiagonalGaussian(mean, torch.tensor(0.5))
    kl_bc = sum(0.5 * (m * m + 0.25 - 1 - math.log(0.25)) for m in mu)
    assert post_bc.kl().item() == pytest.approx(kl_bc, rel=1e-6)
    # A standard normal posterior has zero KL.
    assert DiagonalGaussian(torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)).kl().abs().max() == 0


def test_sample_statistics_and_generator() -> None:
    mean = torch.full((4, 2, 16, 16), 3.0)
    post = DiagonalGaussian(mean, torch.full_like(mean, 0.5))
    x = post.sample(torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(3.0, abs=0.05)
    assert x.std().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(x, post.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(post.mode(), mean)


def test_forward_without_sampling_returns_mode() -> None:
    torch.manual_seed(0)
    vae = small_vae(2)
    images = torch.randn(2, 3, 16, 16)
    _, post, latents = vae(images, sample_posterior=False)
    assert torch.equal(latents, post.mean)
    _, _, sampled = vae(images, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, post.mean)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="fixed, learnable, layernorm"):
        VAE(posterior="gaussian")
    with pytest.raises(ValueError, match="1 to 5"):
        VAE(channel_mult=(1, 1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="fixed_std"):
        VAE(fixed_std=0.0)
    with pytest.raises(ValueError, match="latent_channels >= 2"):
        VAE(posterior="layernorm", latent_channels=1)
    vae = small_vae(3)
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.randn(1, 3, 4, 4))


def test_posterior_rejects_a_std_that_does_not_broadcast():
    with pytest.raises(ValueError, match="does not broadcast"):
        DiagonalGaussian(torch.zeros(2, 3, 4), torch.ones(2, 5, 4))
    DiagonalGaussian(torch.zeros(2, 3, 4), torch.ones(3, 1))  # broadcasts
