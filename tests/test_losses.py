"""Tests of simflow.losses: reconstruction, LPIPS wrapper, PatchGAN, KL and REPA pieces."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from simflow import losses
from simflow.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    REPAProjector,
    adversarial_weight,
    build_perceptual_loss,
    build_target_encoder,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
    reconstruction_loss,
    repa_alignment_loss,
    resample_tokens,
)
from simflow.vae import DiagonalGaussian

# ---------------------------------------------------------------- reconstruction / KL


def test_reconstruction_loss_values() -> None:
    target = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(target, 0.5)
    recon[0] = -2.0  # half the pixels off by 2, half by 0.5
    assert reconstruction_loss(recon, target).item() == pytest.approx((2.0 + 0.5) / 2)
    mse = reconstruction_loss(recon, target, l1_weight=0.0, mse_weight=1.0)
    assert mse.item() == pytest.approx((4.0 + 0.25) / 2)
    both = reconstruction_loss(recon, target, l1_weight=2.0, mse_weight=0.5)
    assert both.item() == pytest.approx(2 * 1.25 + 0.5 * 2.125)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(recon, target[:1])


def test_kl_loss_is_batch_mean_of_summed_kl() -> None:
    mean = torch.zeros(2, 1, 1, 2)
    mean[1] = 1.0  # sample 1: KL = 0.5 * (1 + 1) = 1 nat; sample 0: 0
    post = DiagonalGaussian(mean, torch.ones_like(mean))
    assert kl_loss(post).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- adversarial


def test_hinge_losses_on_hand_picked_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2     -> mean 1
    expected = 0.5 * (2.5 / 3 + 1.0)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(expected)
    # A perfectly separated discriminator (margins beyond ±1) has zero loss.
    assert hinge_discriminator_loss(torch.tensor([3.0]), torch.tensor([-3.0])).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.0 / 3.0 * -(-2.0 + 0.0 + 1.0))


def test_adversarial_weight_schedule() -> None:
    assert adversarial_weight(0, start_step=10, weight=0.1) == 0.0
    assert adversarial_weight(9, start_step=10, weight=0.1) == 0.0
    assert adversarial_weight(10, start_step=10, weight=0.1) == pytest.approx(0.1)
    assert adversarial_weight(500, start_step=0, weight=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("size, n_layers, out", [(32, 2, 6), (32, 3, 2), (64, 3, 6), (16, 1, 6)])
def test_patch_discriminator_shapes(size: int, n_layers: int, out: int) -> None:
    disc = PatchDiscriminator(in_channels=3, base_channels=8, n_layers=n_layers, image_size=size)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)


def test_patch_discriminator_rejects_too_small_images() -> None:
    assert PatchDiscriminator.max_layers_for(32) == 3
    with pytest.raises(ValueError, match="n_layers <= 3"):
        PatchDiscriminator(n_layers=4, image_size=32)
    disc = PatchDiscriminator(in_channels=1, base_channels=8, n_layers=3)
    with pytest.raises(ValueError, match="too small"):
        disc(torch.randn(1, 1, 16, 16))


def test_group_norm_discriminator_is_batch_independent() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=3, base_channels=8, n_layers=2).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[:1], disc(x[:1]))
    grads = torch.autograd.grad(generator_adversarial_loss(disc(x)), disc.main[0].weight)
    assert grads[0].abs().sum() > 0


# ---------------------------------------------------------------- LPIPS


def test_perceptual_loss_without_weights_explains_where_to_put_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss(net="vgg")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "backbone_weights_path" in msg and "weight to 0" in msg
    with pytest.raises(FileNotFoundError, match="backbone_weights_path="):
        PerceptualLoss(net="alex", backbone_weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="vgg, alex, squeeze"):
        PerceptualLoss(net="resnet")
    # Weight 0: nothing is built, so no weights are needed.
    assert build_perceptual_loss(0.0) is None


def test_lpips_random_backbone_identity_and_gradient() -> None:
    torch.manual_seed(0)
    lp = PerceptualLoss(net="squeeze", random_backbone=True)
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    lp.train()  # a parent's .train() must not switch LPIPS' dropout on
    assert not lp.training and not lp.lpips.lin0.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).item() == 0.0
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = lp(y, x)
    assert d.item() > 0
    d.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert lp(y.detach(), x, reduction="none").shape == (2,)
    # Grayscale inputs are repeated to RGB.
    g = torch.rand(2, 1, 32, 32) * 2 - 1
    assert lp(g, g).item() == 0.0
    assert lp(g, -g).item() > 0


def test_lpips_loads_backbone_from_file_and_hub_cache(tmp_path, monkeypatch) -> None:
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.squeezenet1_1(weights=None)
    file = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(ref.state_dict(), file)
    lp = PerceptualLoss(net="squeeze", backbone_weights_path=file)
    torch.testing.assert_close(getattr(lp.lpips.net.slice1, "0").weight, ref.features[0].weight)
    torch.testing.assert_close(
        getattr(lp.lpips.net.slice7, "12").expand3x3.weight, ref.features[12].expand3x3.weight
    )
    # The same file found in torch hub's cache directory.
    (tmp_path / "checkpoints").mkdir()
    file.rename(tmp_path / "checkpoints" / file.name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    lp2 = PerceptualLoss(net="squeeze")
    torch.testing.assert_close(
        getattr(lp2.lpips.net.slice3, "6").squeeze.weight, ref.features[6].squeeze.weight
    )
    # A file of the wrong architecture is refused with a message naming it.
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision squeezenet1_1 state dict"):
        PerceptualLoss(net="squeeze", backbone_weights_path=bad)


# ---------------------------------------------------------------- REPA


def test_repa_loss_extremes() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32)
    assert repa_alignment_loss(x, x).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_alignment_loss(x, 3.0 * x).item() == pytest.approx(-1.0, abs=1e-6)  # scale-free
    assert repa_alignment_loss(x, -x).item() == pytest.approx(1.0, abs=1e-6)
    a, b = torch.randn(8, 64, 512), torch.randn(8, 64, 512)
    assert abs(repa_alignment_loss(a, b).item()) < 0.01  # cos of independent vectors ~ N(0, 1/D)
    with pytest.raises(ValueError, match="resample_tokens"):
        repa_alignment_loss(a, b[:, :16])


def test_repa_projector_shapes_and_gradient() -> None:
    proj = REPAProjector(in_dim=24, out_dim=40, hidden_dim=16)
    h = torch.randn(2, 9, 24, requires_grad=True)
    out = proj(h)
    assert out.shape == (2, 9, 40)
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 16), (16, 16), (16, 40)]
    assert REPAProjector(8).net[0].out_features == 2048  # REPA default hidden width
    repa_alignment_loss(out, torch.randn(2, 9, 40)).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_resample_tokens() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 5)
    assert resample_tokens(tokens, 4) is tokens
    up = resample_tokens(tokens, 8)
    assert up.shape == (2, 64, 5)
    # A constant grid stays constant; a 2x2 -> 1x1 bilinear (antialias-free) resize averages.
    const = torch.ones(1, 64, 3) * torch.tensor([1.0, -2.0, 5.0])
    torch.testing.assert_close(
        resample_tokens(const, 3), torch.ones(1, 9, 3) * torch.tensor([1.0, -2.0, 5.0])
    )
    small = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    assert resample_tokens(small, 1).item() == pytest.approx(1.5)
    # Row-major order is kept: a horizontal ramp stays a horizontal ramp.
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1)
    res = resample_tokens(ramp, 8).view(8, 8)
    assert (res[:, 1:] >= res[:, :-1]).all() and torch.equal(res[0], res[7])
    with pytest.raises(ValueError, match="not a square"):
        resample_tokens(torch.randn(1, 15, 2), 4)


class _PatchMean(nn.Module):
    """Toy target: 4x4 average-pooled pixels as (B, N, C) tokens, with a learnable scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.drop = nn.Dropout(0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2) * self.scale)


def test_module_target_encoder_is_frozen() -> None:
    enc = build_target_encoder("module", module=_PatchMean())
    enc.train()
    assert not enc.training and not enc.module.drop.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    tokens = enc(x)
    assert tokens.shape == (2, 16, 3) and not tokens.requires_grad
    torch.testing.assert_close(enc(x), tokens)  # dropout is off
    with pytest.raises(ValueError, match="module=<nn.Module>"):
        build_target_encoder("module")
    with pytest.raises(ValueError, match="dinov2_vitb14"):
        build_target_encoder("clip")


def test_dinov2_missing_path_explains_how_to_get_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="github.com/facebookresearch/dinov2"):
        build_target_encoder("dinov2_vitb14", None)
    (tmp_path / "hubconf.py").write_text("")
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
        build_target_encoder("dinov2_vitb14", tmp_path, checkpoint_path=tmp_path / "nope.pth")


def test_dinov2_local_hub_plumbing(tmp_path: Path) -> None:
    """A fake local DINOv2 repo checks the preprocessing and the checkpoint loading."""
    (tmp_path / "hubconf.py").write_text(textwrap.dedent("""
            import torch
            from torch import nn

            class Fake(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.w = nn.Parameter(torch.zeros(3))

                def forward_features(self, x):
                    self.seen = x
                    tokens = nn.functional.avg_pool2d(x, 14).flatten(2).transpose(1, 2)
                    return {"x_norm_patchtokens": tokens * self.w}

            def dinov2_vitb14(pretrained=True, **kw):
                assert not pretrained, "must not download"
                return Fake()
            """))
    torch.save({"w": torch.tensor([1.0, 2.0, 3.0])}, tmp_path / "dinov2_vitb14_pretrain.pth")
    enc = build_target_encoder("dinov2_vitb14", tmp_path)
    assert not any(p.requires_grad for p in enc.parameters())
    images = torch.full((2, 1, 32, 32), 1.0)  # white grayscale in [-1, 1]
    tokens = enc(images)
    assert tokens.shape == (2, 256, 3)  # bicubic resize to 224 -> 16x16 patches
    seen = enc.model.seen
    assert seen.shape == (2, 3, 224, 224)
    # White -> 1.0 in [0, 1] -> ImageNet-normalised per channel, then the checkpoint weights.
    expected = (1.0 - torch.tensor(losses._IMAGENET_MEAN)) / torch.tensor(losses._IMAGENET_STD)
    torch.testing.assert_close(seen[0, :, 100, 100], expected)
    torch.testing.assert_close(tokens[0, 0], expected * torch.tensor([1.0, 2.0, 3.0]))
