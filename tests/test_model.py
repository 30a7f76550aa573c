"""The joint objective: gradient routing per mode, fixed posterior, and learning on digits."""

import pytest
import torch

from simflow.config import load_config
from simflow.data import build_dataset
from simflow.model import build_model

TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16"]


def tiny_model(*overrides, num_classes=10):
    torch.manual_seed(0)
    return build_model(load_config(overrides=TINY + list(overrides)), 1, num_classes).train()


def grads_of(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def has_grad(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def batch(n=8):
    torch.manual_seed(1)
    return torch.rand(n, 1, 8, 8) * 2 - 1, torch.arange(n) % 10


def encoder_decoder_grads(model, nll_weight):
    model.cfg.decoder_scale, model.cfg.nll_weight = None, nll_weight
    model.zero_grad()
    images, labels = batch()
    torch.manual_seed(7)  # same posterior noise and label dropout in both passes
    model.training_losses(images, labels, 0).total.backward()
    enc = torch.cat([p.grad.flatten() for p in model.vae.encoder.parameters()])
    dec = torch.cat([p.grad.flatten() for p in model.vae.decoder.parameters()])
    return enc, dec


def test_end_to_end_flow_loss_reaches_the_encoder_and_not_the_decoder():
    """No stop-gradient (SimFlow): the flow NLL changes the encoder's gradient, and only it."""
    model = tiny_model("model.mode=end_to_end", "model.kl_weight=0")
    enc_with, dec_with = encoder_decoder_grads(model, 1.0)
    enc_without, dec_without = encoder_decoder_grads(model, 0.0)
    assert (enc_with - enc_without).abs().max() > 1e-6
    assert torch.allclose(dec_with, dec_without, atol=1e-7)


def test_frozen_vae_gets_no_gradient():
    model = tiny_model("model.mode=frozen_vae", "vae.posterior=learnable", "model.latent_noise_std=0.1")
    images, labels = batch()
    model.training_losses(images, labels, 0).total.backward()
    assert all(not p.requires_grad for p in model.vae.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    assert has_grad(model.flow)
    assert set(model.parameter_groups()) == {"flow"}
    assert not model.vae.training, "a frozen VAE stays in eval mode"


def test_frozen_encoder_trains_decoder_only():
    model = tiny_model("model.mode=frozen_encoder", "vae.posterior=learnable", "model.latent_noise_std=0.2")
    images, labels = batch()
    model.training_losses(images, labels, 0).total.backward()
    assert all(p.grad is None for p in model.vae.encoder.parameters())
    assert has_grad(model.vae.decoder) and has_grad(model.flow)


def test_fixed_posterior_std_is_exactly_sigma_bar():
    model = tiny_model("vae.posterior=fixed", "vae.fixed_std=0.37")
    for scale in (0.01, 1.0, 100.0):
        posterior = model.vae.encode(torch.randn(5, 1, 8, 8) * scale)
        assert torch.equal(posterior.std, torch.full_like(posterior.mean, 0.37))


def test_entropy_term_is_constant_for_the_fixed_posterior():
    model = tiny_model("vae.posterior=fixed")
    images, labels = batch()
    out = model.training_losses(images, labels, 0)
    d = model.flow.num_dims
    entropy_per_dim = 0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e * 0.25))
    assert out.terms["nll_per_dim"] - out.terms["rate_per_dim"] == pytest.approx(entropy_per_dim.item(), abs=1e-4)


def test_pixel_mode_has_no_vae_and_uniform_dequantisation_is_tarflows():
    model = tiny_model("model.mode=pixel", "model.noise_type=uniform")
    assert model.vae is None
    levels = torch.arange(256.0)
    images = (levels / 127.5 - 1).reshape(1, 1, 16, 16)  # every 8-bit value
    noisy = model.add_noise(images)
    # TarFlow's train.py: v + U[0, 1) on the 0..255 scale, then /256·2 − 1: level v fills the
    # bin [v/128 − 1, (v+1)/128 − 1), the bins tile [−1, 1) and never overlap
    v = levels.reshape(1, 1, 16, 16)
    assert torch.all(noisy >= v / 128 - 1 - 1e-6) and torch.all(noisy < (v + 1) / 128 - 1)
    assert float(noisy.max()) < 1.0 and float(noisy.min()) >= -1.0


@pytest.mark.slow
def test_two_hundred_end_to_end_steps_on_digits_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_model("model.mode=end_to_end", "model.kl_weight=0")
    data = build_dataset("digits", None, "train", 8)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def evaluate():
        model.eval()
        with torch.no_grad():
            torch.manual_seed(123)
            out = model.training_losses(images[:256], labels[:256], 0)
        model.train()
        return out.terms

    before = evaluate()
    for step in range(200):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        out = model.training_losses(images[idx], labels[idx], step)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    after = evaluate()
    assert after["total"] < 0.7 * before["total"]
    assert after["reconstruction"] < before["reconstruction"]
    assert after["rate_per_dim"] < before["rate_per_dim"]
