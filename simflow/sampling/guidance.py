"""Guidance strategies: how the conditional and the unconditional step parameters are combined.

The sampler runs both branches in one batched pass of size 2B (conditional rows first) and hands
each token's (or each Jacobi chunk's) parameters of the two halves to a :class:`GuidanceStrategy`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from simflow.flow import StepParams


class GuidanceStrategy(Protocol):
    """Combines conditional and unconditional step parameters into the guided ones.

    ``weight`` is the guidance scale w (0 = no guidance); ``position`` the token index in the block's
    order (0-based) and ``num_tokens`` the block's length T, for schedules annealed over tokens.
    A strategy whose class sets ``accepts_position_tensor = True`` also accepts ``position`` as a
    (1, n, 1) long tensor for n positions at once (used by Jacobi sampling; others are called
    position by position).
    """

    def __call__(self, cond: StepParams, uncond: StepParams, weight: float, position: int,
                 num_tokens: int) -> StepParams: ...


def annealed_weight(weight: float, position: int | Tensor, num_tokens: int) -> float | Tensor:
    """TarFlow's annealed schedule: w_i = w·(i+1)/T, ramping up over the token index."""
    return weight * (position + 1) / num_tokens


class LinearGuidance:
    """TarFlow's CFG: linear extrapolation p = p_c + w·(p_c − p_u) of the shift and/or log-scale.

    ``guide`` chooses what is extrapolated: ``"shift"``, ``"scale"`` or ``"both"``; ``annealed``
    ramps w over the token index as in TarFlow's FID evaluation.
    """

    accepts_position_tensor = True

    def __init__(self, guide: str = "both", annealed: bool = False):
        if guide not in ("shift", "scale", "both"):
            raise ValueError(f"guide must be 'shift', 'scale' or 'both', got {guide!r}")
        self.guide = guide
        self.annealed = annealed

    def __call__(self, cond: StepParams, uncond: StepParams, weight: float, position: int,
                 num_tokens: int) -> StepParams:
        w = annealed_weight(weight, position, num_tokens) if self.annealed else weight
        shift, log_scale = cond.shift, cond.log_scale
        # p_c + w·(p_c − p_u) as one lerp from p_u towards p_c by 1 + w (one op instead of two;
        # it runs per token): lerp(u, c, 1 + w) = c + w·(c − u) for 1 + w ≥ ½ (torch's formula).
        if self.guide in ("shift", "both"):
            shift = torch.lerp(uncond.shift, cond.shift, 1 + w)
        if self.guide in ("scale", "both"):
            log_scale = torch.lerp(uncond.log_scale, cond.log_scale, 1 + w)
        return StepParams(shift, log_scale)


class PrecisionGuidance:
    """STARFlow's guidance: sample the Gaussian ∝ p_c^(1+w) / p_u^w in precision form.

    With s = min(σ_c/σ_u, 1)²: σ = σ_c / √(1 + w − w·s) and μ = ((1+w)·μ_c − w·s·μ_u)/(1 + w − w·s).
    """

    accepts_position_tensor = True

    def __init__(self, annealed: bool = False):
        self.annealed = annealed

    def __call__(self, cond: StepParams, uncond: StepParams, weight: float, position: int,
                 num_tokens: int) -> StepParams:
        w = annealed_weight(weight, position, num_tokens) if self.annealed else weight
        s = torch.exp(2 * (cond.log_scale - uncond.log_scale)).clamp(max=1.0)
        denom = 1 + w - w * s
        shift = ((1 + w) * cond.shift - w * s * uncond.shift) / denom
        return StepParams(shift, cond.log_scale - 0.5 * torch.log(denom))


GUIDANCE_STRATEGIES: dict[str, Callable[..., GuidanceStrategy]] = {
    "linear": LinearGuidance,
    "precision": PrecisionGuidance,
}
"""Guidance strategies by name. SimFlow's "revised" CFG is not published (docs/sources.md);
register it here (``GUIDANCE_STRATEGIES["simflow"] = MyGuidance``) once its formula is known."""


def build_guidance(name: str, **options) -> GuidanceStrategy:
    """The strategy registered as ``name`` in :data:`GUIDANCE_STRATEGIES`, built with ``options``
    (e.g. ``guide="shift"``, ``annealed=True``)."""
    if name not in GUIDANCE_STRATEGIES:
        raise ValueError(f"unknown guidance method {name!r}; known: {sorted(GUIDANCE_STRATEGIES)}")
    return GUIDANCE_STRATEGIES[name](**options)
