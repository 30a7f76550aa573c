"""The rate of a latent model: how much the encoder tells the flow about each image.

In the ELBO of a latent flow (SimFlow, arXiv 2512.04084, §3),

    −ELBO = E_q[−log p_dec(i|x)] + E_q[−log p_flow(x)] − H(q(x|i))
          = distortion            + rate,

and the **rate** ``E_q[−log p_flow(x)] − H(q)`` is the prior KL, ≥ 0 in expectation over images.
The flow's NLL can never fall below the posterior entropy H(q): that is its *floor*, and the rate
is the NLL's gap above it. A rate near 0 means a collapsed encoder: its latents say (almost)
nothing about the image, the decoder learns to ignore them, and generation quality reflects a
class-mean blob, not the method. These statistics are logged at every log step of training.

Units: nats per latent dimension unless a name says bits; "dims" are the C·h·w latent
dimensions of one image.

* ``rate_per_dim``: (NLL − H(q)) / D;  ``rate_bits_per_image``: the same in bits per image.
* ``entropy_per_dim``: the floor H(q)/D (a constant for the fixed posterior: ½·log(2πe·σ̄²)).
* ``mu_spread_rel``: the spread of the posterior mean across images (std over the batch, averaged
  over dims) relative to the posterior std; ≪ 1 means the noise σ drowns the signal.
* ``active_fraction``: the fraction of dims whose mean varies across images by more than 1 % of
  the posterior variance, Var_i(μ_d) / E_i[σ_d²] > 0.01 (the active-unit criterion of Burda et
  al., arXiv 1509.00519, §5.2, measured against the posterior noise rather than a unit prior).
* ``posterior_std``: the mean posterior std (informative for learnable posteriors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The rate-monitor metrics kept in the training summary (last log window), by their names in
#: the training loop's terms (``train/<name>`` in MLflow).
RATE_KEYS = ("rate_per_dim", "rate_bits_per_image", "entropy_per_dim", "nll_per_dim", "mu_spread",
             "mu_spread_rel", "active_fraction", "posterior_std", "recon_mae", "decoder_scale", "nll_weight",
             "psnr")
#: Var_i(μ_d) / E_i[σ_d²] above which a latent dimension counts as active.
ACTIVE_THRESHOLD = 0.01

__all__ = ["ACTIVE_THRESHOLD", "RATE_KEYS", "CollapseMonitor", "collapse_reasons", "rate_statistics", "is_collapsed"]


@torch.no_grad()
def rate_statistics(mean: Tensor, std: Tensor, nll: Tensor | None, entropy: Tensor | None) -> dict[str, Tensor]:
    """Rate-monitor statistics of one batch (detached 0-d tensors; see the module docstring).

    Args:
        mean: posterior means (B, C, h, w) in the flow's units.
        std: posterior stds, broadcastable to ``mean`` (0 where the latent is deterministic).
        nll: the flow's −log p(x) per image (B,) in nats, or None when no flow is trained.
        entropy: H(q(x|i)) per image (B,) in nats, or None when the posterior is a point mass.
    """
    var = std.detach().float().expand_as(mean).flatten(1) ** 2
    mean = mean.detach().float().flatten(1)
    dims = mean.shape[1]
    spread = mean.std(0) if mean.shape[0] > 1 else torch.zeros_like(mean[0])
    noise_var = var.mean(0)
    out = {"posterior_std": var.sqrt().mean(), "mu_spread": spread.mean()}
    if bool((noise_var > 0).all()):
        out["mu_spread_rel"] = (spread / noise_var.sqrt()).mean()
        out["active_fraction"] = (spread.pow(2) / noise_var > ACTIVE_THRESHOLD).float().mean()
    if nll is not None and entropy is not None:
        rate = (nll.detach().float() - entropy.detach().float()).mean() / dims
        out["entropy_per_dim"] = entropy.detach().float().mean() / dims
        out["rate_per_dim"] = rate
        out["rate_bits_per_image"] = rate * dims / math.log(2)
    return out


def is_collapsed(rate_per_dim: float | None, threshold: float) -> bool:
    """Whether a measured rate (nats/dim) sits at the floor: below ``threshold``."""
    return rate_per_dim is not None and math.isfinite(rate_per_dim) and rate_per_dim < threshold


def collapse_reasons(stats: dict[str, float], threshold: float, min_active_fraction: float) -> list[str]:
    """The collapse criteria that one log window's statistics meet (empty: healthy): the mean
    rate below ``threshold`` nats/dim, or fewer than ``min_active_fraction`` of the dims active
    (a partial collapse that a few busy dims hide from the mean rate)."""
    reasons = []
    rate = stats.get("rate_per_dim")
    if is_collapsed(rate, threshold):
        reasons.append(f"rate {rate:.4f} nats/dim < {threshold}")
    active = stats.get("active_fraction")
    if active is not None and math.isfinite(active) and active < min_active_fraction:
        reasons.append(f"{active:.0%} of the latent dims active < {min_active_fraction:.0%}")
    return reasons


class CollapseMonitor:
    """The collapse alarm: a collapse criterion (:func:`collapse_reasons`) is met for
    ``patience`` consecutive log steps after warm-up. Fires once; ``alarm_step`` and
    ``alarm_reason`` record when and why (the training summary's collapse verdict)."""

    def __init__(self, threshold: float, min_active_fraction: float, patience: int, warmup_steps: int,
                 state: dict | None = None):
        self.threshold, self.min_active = threshold, min_active_fraction
        self.patience, self.warmup = patience, warmup_steps
        state = state or {}
        self.below: int = state.get("below", 0)
        self.alarm_step: int | None = state.get("alarm_step")
        self.alarm_reason: str | None = state.get("alarm_reason")

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run continues the count."""
        return {"below": self.below, "alarm_step": self.alarm_step, "alarm_reason": self.alarm_reason}

    def update(self, step: int, stats: dict[str, float]) -> bool:
        """Record one log window's rate statistics; True when the alarm fires at this step."""
        if "rate_per_dim" not in stats and "active_fraction" not in stats or step <= self.warmup:
            return False
        reasons = collapse_reasons(stats, self.threshold, self.min_active)
        self.below = self.below + 1 if reasons else 0
        if self.below >= self.patience and self.alarm_step is None:
            self.alarm_step, self.alarm_reason = step, "; ".join(reasons)
            return True
        return False
