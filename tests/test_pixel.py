"""Pixel-space TarFlow: bits/dim as TarFlow computes it, and the noise-augmented sampler."""

import json
import math

import pytest
import torch
import yaml

from simflow.cli import main
from simflow.config import load_config
from simflow.model import build_model
from simflow.stages import eval_images
from simflow.sampling import sample
from simflow.checkpoints import atomic_save


def pixel_config(tmp_path, **model):
    cfg = {"study": "t", "variant": "pix", "run_dir": str(tmp_path / "run"), "results_root": str(tmp_path),
           "data": {"name": "digits", "image_size": 8},
           "flow": {"channels": 32, "layers_per_block": [1, 1], "head_dim": 16, "patch_size": 2},
           "model": {"mode": "pixel", "noise_type": "uniform", **model},
           "eval": {"num_nll": 12}, "tracking": {"enabled": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def save_random_pixel_model(path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10).eval()
    with torch.no_grad():
        for block in model.flow.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    state = model.state_dict()
    atomic_save({"ema": state, "model": state, "data_info": {"channels": 1, "num_classes": 10}},
                path / "run" / "model.pt")
    return model


def test_bits_per_dim_of_a_fixed_model_matches_a_direct_computation(tmp_path):
    config_path = pixel_config(tmp_path)
    cfg = load_config(config_path)
    model = save_random_pixel_model(tmp_path, cfg).double()
    assert main(["nll", "-c", str(config_path)]) == 0
    reported = json.loads((tmp_path / "run" / "metrics" / "nll.json").read_text())

    # Direct: the same dequantised images, −log N(f(x)) − log|det ∂f/∂x| with the Jacobian from
    # autograd, then the 8-bit correction: density on [−1, 1] with bins of width 2/255.
    images, labels = eval_images(cfg, 12)
    torch.manual_seed(0)
    x = (images + torch.rand_like(images) * (2.0 / 255.0)).double()
    total = 0.0
    for i in range(len(x)):
        xi, yi = x[i:i + 1], labels[i:i + 1]
        z, _ = model.flow(xi, yi)
        jac = torch.autograd.functional.jacobian(lambda v: model.flow(v, yi)[0], xi).reshape(64, 64)
        log_det = torch.linalg.slogdet(jac)[1]
        nll = -torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() - log_det
        total += float(nll.detach())
    bpd = (total / len(x) / 64 + math.log(127.5)) / math.log(2)
    assert reported["nll_bpd"] == pytest.approx(bpd, rel=1e-5)
    assert "pixels" in reported["space"]


def test_pixel_sampling_with_denoising_uses_the_pixel_noise_level(tmp_path):
    config_path = pixel_config(tmp_path, noise_type="gaussian", latent_noise_std=0.1)
    cfg = load_config(config_path)
    model = save_random_pixel_model(tmp_path, cfg)
    noise = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 1, 2])
    raw = sample(model.flow, noise, labels)
    expected = model.flow.denoise(raw, 0.1, labels).clamp(-1, 1)
    assert torch.allclose(model.generate(noise, labels, denoise=True), expected, atol=1e-6)
    assert not torch.allclose(model.generate(noise, labels), expected, atol=1e-4)
