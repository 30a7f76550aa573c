"""The weights a stage evaluates and the precision it computes in: the EMA of a model's
parameters, swapping them in place, and the autocast of ``train.precision``.

Shared by the training loop, which keeps the EMA and logs sample grids from it, and by the
evaluation stages, which sample and encode with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from simflow.config import Config

__all__ = ["EMA", "autocast", "ema_weights"]


class EMA:
    """Exponential moving average of the trainable floating-point parameters (and a copy of the
    buffers, e.g. the latent scale), kept as a full state dict of the model.

    The decay warms up as min(decay, (1 + t)/(10 + t)) over update t, so a short run (the demo)
    is not evaluated on weights that have barely left their initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.tracked = {name for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            if name in self.tracked and decay > 0:
                self.state[name].lerp_(value, 1 - decay)
            else:
                self.state[name].copy_(value)


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema_state: dict) -> Iterator[nn.Module]:
    """``model`` with the EMA weights loaded and in eval mode; its own weights and mode come back
    on exit (the parameter tensors stay the optimiser's). In place rather than on a
    ``copy.deepcopy``: no second model in memory (5 GB at the paper's flow size), and no deep copy
    of ``torch.compile`` d blocks (``train.compile``), which PyTorch does not document (with torch
    2.14 such a copy does run its own weights, without recompiling)."""
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.load_state_dict(ema_state)
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(own)
        model.train(was_training)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast where ``train.precision`` asks for it (``auto``: on CUDA), else a no-op."""
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
