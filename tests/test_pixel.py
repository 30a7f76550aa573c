"""Pixel-space TarFlow: bits/dim as TarFlow computes it, and the noise-augmented sampler."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from simflow.cli import main
from simflow.config import load_config
from simflow.model import DEQUANTISED_LOG_SCALE, build_model, dequantise
from simflow.stages import bayes_predictions, eval_images
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

    # Direct: the same dequantised images (TarFlow's (v + u)/128 − 1), −log N(f(x)) − log|det ∂f/∂x|
    # with the Jacobian from autograd, then the 8-bit correction: bins of width 1/128 on [−1, 1).
    images, labels = eval_images(cfg, 12)
    torch.manual_seed(0)
    x = (((images + 1) * 127.5 + torch.rand_like(images)) / 128 - 1).double()
    total = 0.0
    for i in range(len(x)):
        xi, yi = x[i:i + 1], labels[i:i + 1]
        z, _ = model.flow(xi, yi)
        jac = torch.autograd.functional.jacobian(lambda v: model.flow(v, yi)[0], xi).reshape(64, 64)
        log_det = torch.linalg.slogdet(jac)[1]
        nll = -torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() - log_det
        total += float(nll.detach())
    bpd = (total / len(x) / 64 + math.log(128)) / math.log(2)
    assert reported["nll_bpd"] == pytest.approx(bpd, rel=1e-5)
    assert "pixels" in reported["space"]
    assert reported["protocol"] == "tarflow_uniform_dequantisation"


def test_bits_per_dim_of_the_identity_flow_is_the_standard_normal_density_by_tarflows_formula(tmp_path):
    # A fresh flow is the identity (zero output projections): z = x, log|det| = 0, so the NLL is
    # the standard normal's, and TarFlow's evaluate_bpd.py gives, per image,
    # bpd = (−Σ log N(x_i) / D + log 128) / ln 2 with x the dequantised pixels (v + u)/128 − 1.
    config_path = pixel_config(tmp_path, noise_type="gaussian", latent_noise_std=0.1)
    cfg = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10).eval()
    state = model.state_dict()
    atomic_save({"ema": state, "model": state, "data_info": {"channels": 1, "num_classes": 10}},
                tmp_path / "run" / "model.pt")
    images, _ = eval_images(cfg, 12)
    torch.manual_seed(0)
    x = dequantise(images).double()
    z, logdet = model.flow.double()(x)
    assert torch.equal(z, x) and torch.all(logdet == 0)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    expected = float(((-log_p / 64 + math.log(128)) / math.log(2)).mean())
    assert DEQUANTISED_LOG_SCALE == pytest.approx(math.log(128))
    assert main(["nll", "-c", str(config_path)]) == 0
    reported = json.loads((tmp_path / "run" / "metrics" / "nll.json").read_text())
    assert reported["nll_bpd"] == pytest.approx(expected, rel=1e-6)
    # the label-blind identity flow: p(x) = (1/K) Σ_c p(x | c) = p(x | y)
    assert reported["nll_bpd_marginal"] == pytest.approx(expected, rel=1e-6)
    # a Gaussian-noise model's score is labelled as the bound it is, not as TarFlow's protocol
    assert reported["protocol"] == "uniform_dequantisation_bound"
    assert "σ=0.1" in reported["protocol_description"]
    # the identity flow ignores the label: every class ties and argmin picks class 0
    _, test_labels = eval_images(cfg, cfg.eval.num_classify)
    assert reported["bayes_num_images"] == len(test_labels)
    assert reported["bayes_accuracy"] == pytest.approx(float((test_labels == 0).float().mean()))


def _two_class_model(tmp_path):
    """A class-conditional pixel flow on 4×4 images, fitted for a few steps to two classes whose
    pixels are N(−0.5, 0.1²) (class 0) and N(+0.5, 0.1²) (class 1): its Bayes classifier is known
    to be (near) perfect."""
    cfg = load_config(overrides=["data.name=digits", "data.image_size=4", "model.mode=pixel",
                                 "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16",
                                 "flow.patch_size=2", "flow.conditioning=add"])
    torch.manual_seed(0)
    model = build_model(cfg, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def draw(n):
        y = torch.randint(2, (n,))
        return (y.float() - 0.5)[:, None, None, None] + 0.1 * torch.randn(n, 1, 4, 4), y

    for _ in range(60):
        x, y = draw(64)
        loss = model.flow.nll(x, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), draw


def test_bayes_classifier_recovers_two_separable_classes_and_permuting_the_labels_permutes_it(tmp_path):
    model, draw = _two_class_model(tmp_path)
    torch.manual_seed(1)
    x, y = draw(200)
    with torch.no_grad():
        pred = bayes_predictions(model, x, torch.device("cpu"))
        assert float((pred == y).float().mean()) >= 0.98
        nll = model.flow.class_nll(x)
        # column c is −log p(x | c): the same as the per-label NLL
        assert torch.allclose(nll[:, 1], model.flow.nll(x, torch.ones(200, dtype=torch.long)), atol=1e-4)
        model.flow.class_embed.weight.copy_(model.flow.class_embed.weight.flip(0))  # swap the labels
        swapped = bayes_predictions(model, x, torch.device("cpu"))
    assert torch.equal(swapped, 1 - pred)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().flow.class_nll(x)


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


def test_guidance_sweep_reuses_the_model_and_its_first_weight_is_the_sample_stage(tmp_path):
    from helpers_fid import torch_threads, write_random_classifier
    from simflow.analysis.figures import fig_guidance_sweep
    from simflow.data import build_dataset
    from simflow.fid import compute_reference_statistics, register_classifier_extractor

    classifier = write_random_classifier(tmp_path / "clf.pt", image_size=8, feature_dim=8)
    register_classifier_extractor(classifier)
    ref = compute_reference_statistics(build_dataset("digits", None, "train", 8), tmp_path / "ref.npz",
                                       feature_extractor="simflow-classifier", cuda=False)
    config_path = pixel_config(tmp_path, noise_type="gaussian", latent_noise_std=0.1)
    raw = yaml.safe_load(config_path.read_text())
    raw["eval"].update(feature_extractor="simflow-classifier", classifier_path=str(classifier),
                       reference_stats=str(ref), isc=False, guidance_weights=[0.0, 2.0])
    raw["sample"] = {"num_samples": 40, "batch_size": 20, "denoise": True}
    raw["flow"]["conditioning"] = "add"  # AdaLN starts label-blind (zero-initialised): guidance would be a no-op
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    save_random_pixel_model(tmp_path, cfg)
    with torch_threads(1):
        for stage in ("sample", "fid", "guidance"):
            assert main([stage, "-c", str(config_path)]) == 0, stage
    run = tmp_path / "run"
    sweep = json.loads((run / "metrics" / "guidance.json").read_text())["sweep"]
    assert [row["guidance"] for row in sweep] == [0.0, 2.0]
    # weight 0 is the sample stage's own draw (same seeded noise and labels): the same gFID
    assert sweep[0]["fid"] == pytest.approx(json.loads((run / "metrics" / "fid.json").read_text())["fid"])
    with np.load(run / "guidance_samples.npz") as npz:
        images, weights = npz["images"], npz["weights"]
    with np.load(run / "samples.npz") as npz:
        assert np.array_equal(images[0], npz["arr_0"][:20])
    assert images.shape == (2, 20, 8, 8, 1) and weights.tolist() == [0.0, 2.0]
    assert not np.array_equal(images[0], images[1])  # guidance changed the samples
    fig_guidance_sweep(weights, [r["fid"] for r in sweep], images)
    with pytest.raises(ValueError, match="same length"):
        fig_guidance_sweep(weights, [1.0], images)


def test_guidance_stage_without_weights_is_one_clear_error(tmp_path, capsys):
    config_path = pixel_config(tmp_path)
    cfg = load_config(config_path)
    save_random_pixel_model(tmp_path, cfg)
    assert main(["guidance", "-c", str(config_path)]) == 2
    assert "eval.guidance_weights is empty" in capsys.readouterr().err
