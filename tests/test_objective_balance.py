"""Every loss term keeps its source recipe's balance against its partner, whatever the rate weight w.

Measured on gradients, not read off coefficients: for a tiny model, the gradient that a term puts
on a parameter set is compared with the gradient of the raw (unit-weight) term, which gives the
term's effective coefficient there.

* REPA (REPA-E, arXiv 2504.10483): the flow's alignment at 0.5 × its generative loss' weight (here
  the NLL's w), the VAE's at 1.5 × its reconstruction weight, in end-to-end and frozen modes.
* ``train.grad_clip`` bounds the gradient in the optimiser's anchor units (the flow's NLL weight),
  so a clip of c bounds the flow's own objective at c in every mode.
"""

from dataclasses import replace

import pytest
import torch

from simflow.config import load_config
from simflow.distributed import DistEnv
from simflow.losses import REPAProjector, build_target_encoder, repa_alignment_loss, resample_tokens
from simflow.model import QUANTISATION_STEP, SimFlowModel, build_model
from simflow.train import apply_gradients

TINY = ["data.name=digits", "data.image_size=8", "vae.channel_mult=[1,2]", "vae.base_channels=8",
        "vae.latent_channels=4", "flow.channels=32", "flow.layers_per_block=[1,1]", "flow.head_dim=16",
        "flow.label_drop=0"]
REPA_LAYER, B = 1, 0.05  # B: the calibrated decoder scale given to the step


class PatchTokens(torch.nn.Module):
    """A fixed random 'representation': 2×2 patches of the image, linearly embedded (B, 16, 8)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 8)

    def forward(self, images):
        patches = torch.nn.functional.unfold(images, 2, stride=2).transpose(1, 2)
        return self.proj(patches)


def repa_model(mode: str, *overrides: str) -> SimFlowModel:
    extra = [f"model.mode={mode}"] + (["vae.posterior=learnable"] if mode != "end_to_end" else [])
    cfg = load_config(overrides=TINY + extra + list(overrides))
    torch.manual_seed(0)
    plain = build_model(cfg, 1, 10)  # repa_weight 0: no target to build
    target = build_target_encoder("module", module=PatchTokens())
    projector = REPAProjector(cfg.flow.channels, 8, 16)
    m = replace(cfg.model, repa_weight=0.5, repa_layer=REPA_LAYER)
    return SimFlowModel(m, plain.flow, plain.vae, repa_projector=projector, repa_target=target).train()


def images_and_labels(n=8):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.arange(n) % 10


def grads(model: SimFlowModel, module: torch.nn.Module, **cfg_changes) -> torch.Tensor:
    """The gradient of the model's total loss on ``module``'s parameters (flattened), with the
    model config changed as given; the same random draws every call."""
    saved = model.cfg
    model.cfg = replace(saved, **cfg_changes)
    try:
        model.zero_grad(set_to_none=True)
        images, labels = images_and_labels()
        torch.manual_seed(5)
        model.training_losses(images, labels, 0, decoder_scale=B).total.backward()
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in module.parameters()])
    finally:
        model.cfg = saved


def raw_grads(model: SimFlowModel, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients on ``module`` of the unit-weight per-dim NLL and REPA alignment of the same
    forward pass (the same draws as :func:`grads`)."""
    images, labels = images_and_labels()
    torch.manual_seed(5)
    x, _, _ = model._flow_posterior(images)
    out = model.flow.to_noise(x, labels, hidden_layer=REPA_LAYER)
    nll = model.flow.nll_from(out.z, out.logdet).mean() / model.flow.num_dims
    target = resample_tokens(model.repa_target(images), 4)
    repa = repa_alignment_loss(model.repa_projector(out.hidden), target)
    params = list(module.parameters())

    def flat(loss):
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(t if t is not None else torch.zeros_like(p)).flatten() for t, p in zip(g, params)])
    return flat(nll), flat(repa)


def coefficient(part: torch.Tensor, unit: torch.Tensor) -> float:
    """The c with part = c·unit, checked to hold exactly (up to float error)."""
    c = float(part @ unit / (unit @ unit))
    torch.testing.assert_close(part, c * unit, atol=1e-6 * float(unit.norm()) + 1e-9, rtol=1e-3)
    return c


@pytest.mark.parametrize("mode", ["end_to_end", "frozen_vae"])
def test_repa_on_the_flow_is_half_the_nll_weight_in_every_mode(mode):
    model = repa_model(mode)
    nll_part = grads(model, model.flow, repa_weight=0.0)
    repa_part = grads(model, model.flow) - nll_part
    nll_unit, repa_unit = raw_grads(model, model.flow)
    w_nll, w_repa = coefficient(nll_part, nll_unit), coefficient(repa_part, repa_unit)
    expected_w = float(model.rate_weight(B, 64))
    assert w_nll == pytest.approx(expected_w, rel=1e-4)
    assert w_repa / w_nll == pytest.approx(0.5, rel=1e-3)
    # the measured gradient norms, the quantity: REPA's share is 0.5 × the raw ratio
    ratio = float(repa_part.norm() / nll_part.norm())
    assert ratio == pytest.approx(0.5 * float(repa_unit.norm() / nll_unit.norm()), rel=1e-3)
    if mode == "end_to_end":
        assert expected_w < 0.1  # the case where an absolute 0.5 would outweigh the NLL


@pytest.mark.parametrize("l1_weight", [1.0, 2.0])
def test_repa_on_the_vae_is_one_and_a_half_the_reconstruction_weight(l1_weight):
    model = repa_model("end_to_end", f"model.l1_weight={l1_weight}")
    without = grads(model, model.vae, repa_weight=0.0)
    repa_part = grads(model, model.vae) - without
    _, repa_unit = raw_grads(model, model.vae)
    assert coefficient(repa_part, repa_unit) / l1_weight == pytest.approx(1.5, rel=1e-3)
    # the flow's share alone (repa_vae_weight 0) is the flow's coefficient, 0.5·w
    flow_share = grads(model, model.vae, repa_vae_weight=0.0) - without
    assert coefficient(flow_share, repa_unit) == pytest.approx(0.5 * float(model.rate_weight(B, 64)), rel=1e-3)


@pytest.mark.parametrize("mode", ["end_to_end", "frozen_vae", "pixel"])
def test_grad_clip_bounds_the_flow_objective_in_its_own_units_in_every_mode(mode):
    """One SGD step (lr 1) moves the flow by the clipped gradient; divided by the NLL weight w it
    is the clipped gradient of the flow's own objective: train.grad_clip in every mode."""
    extra = [] if mode == "end_to_end" else (["vae.posterior=learnable"] if mode != "pixel" else [])
    cfg = load_config(overrides=TINY + [f"model.mode={mode}", "train.grad_clip=1e-3"] + extra)
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10).train()
    images, labels = images_and_labels()
    model.training_losses(images, labels, 0, decoder_scale=B).total.backward()
    before = [p.detach().clone() for p in model.flow.parameters()]
    optimizers = {"flow": torch.optim.SGD(list(model.flow.parameters()), lr=1.0)}
    w = float(model.rate_weight(B, images[0].numel()))
    norms = apply_gradients(optimizers, cfg, DistEnv(), model.gradient_units(B, images[0].numel()))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.flow.parameters(), before)]).norm()
    assert float(norms["flow"]) > 1e-3  # the raw gradient, in NLL units, exceeds the clip
    assert float(moved) / w == pytest.approx(1e-3, rel=1e-3)


def test_calibrated_scale_is_floored_at_the_quantisation_step():
    model = build_model(load_config(overrides=TINY), 1, 10)
    d_lat, d_pix = model.flow.num_dims, 64
    assert float(model.rate_weight(1e-6, d_pix)) == pytest.approx(QUANTISATION_STEP * d_lat / d_pix)
    assert float(model.rate_weight(0.2, d_pix)) == pytest.approx(0.2 * d_lat / d_pix)
