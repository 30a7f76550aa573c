"""FLOPs: of the flow's training step (for MFU), of whole training pipelines (for the
compute-matched comparison), and the devices' peaks.

Two counts, for two purposes:

* :func:`train_flops`, analytic, of the flow alone, for MFU (``simflow bench``, the preflight):

      FLOPs = 6·N_tok·B·T  +  6·N_cond·B  +  6·L·w·B·T²

  with N_tok the weights of every linear map applied per token (qkv, attention output, MLP,
  proj_in, proj_out), N_cond those applied once per sample (AdaLN modulation), L the number of
  transformer layers, w the width, B the batch and T the tokens per image. The last term is causal
  attention (QKᵀ and AV over the lower triangle: 2·w·T²/2 multiply-adds each per layer forward;
  ×3 for forward + backward), FlashAttention's convention: a lower bound on what a kernel that
  computes full tiles executes.
* :func:`step_flops`, counted, of the whole model a resolved config builds (VAE, flow, REPA
  projector): torch's ``FlopCounterMode`` over one real training step (forward and backward of
  :meth:`SimFlowModel.training_losses`: matrix products, convolutions, attention; elementwise work
  is not counted, as in the MFU convention). The step runs at a batch of 2 on the CPU and is
  scaled to the global batch: every counted operation is linear in the batch.

The compute-matched comparison uses the counted FLOPs of the whole pipeline, VAE pre-training
included (:func:`pipeline_flops`), not wall-clock: FLOPs are a property of the method and the
budget, the same on any machine; wall-clock depends on the backend and, on the 2-core machine the
demo is measured on, drifts by a third within an hour (docs/performance.md). Wall-clock is
reported beside it (the summary's ``train_time_s``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from simflow.config import Config
from simflow.data import dataset_info
from simflow.flow import TransformerFlow
from simflow.model import build_model

__all__ = ["BF16_PEAK_TFLOPS", "bf16_peak_tflops", "counted_step_flops", "matched_steps",
           "pipeline_flops", "step_flops", "train_flops"]

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity). The first
# matching substring of torch.cuda.get_device_name() wins, so specific names come first.
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0),
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
    ("RTX 3090", 71.0), ("A6000", 154.8),
]

#: The batch at which :func:`step_flops` runs its counted step.
COUNT_BATCH = 2


def train_flops(flow: TransformerFlow, batch: int) -> dict[str, float]:
    """Analytic FLOPs of one training step of the flow (forward + backward), see the module
    docstring."""
    per_token = per_sample = 0
    for name, module in flow.named_modules():
        if isinstance(module, nn.Linear):
            if ".modulation." in name:
                per_sample += module.weight.numel()
            else:
                per_token += module.weight.numel()
    t, w = flow.num_tokens, flow.width
    layers = sum(flow.layers_per_block)
    dense = 6 * per_token * batch * t + 6 * per_sample * batch
    attention = 6 * layers * w * batch * t * t
    return {"per_token_params": per_token, "per_sample_params": per_sample,
            "dense_flops": float(dense), "attention_flops": float(attention),
            "total_flops": float(dense + attention)}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from :data:`BF16_PEAK_TFLOPS`, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def counted_step_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, step: int,
                       decoder_scale: float | None) -> float:
    """FLOPs of one forward + backward of ``model.training_losses`` on this batch, counted on the
    side: a pass of its own, whose gradients are discarded and whose random draws come from a
    forked RNG, so the training stream and the parameters' gradients stay as they were. (Under
    ``FlopCounterMode`` some kernels dispatch differently, so the counted pass is never the real
    step: its numbers would not be bit-identical to an uncounted run's.)"""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        model.training_losses(images, labels, step, decoder_scale).total.backward()
    for p, g in zip(params, grads):
        p.grad = g
    return float(counter.get_total_flops())


def step_flops(cfg: Config, vae_only: bool = False) -> float:
    """Counted FLOPs of one training step of ``cfg``'s model at ``train.global_batch_size``
    (``vae_only``: the ``pretrain-vae`` stage's step, no flow term). Random weights and inputs
    of the configured shapes; the global RNG is left as it was."""
    info = dataset_info(cfg.data.name)
    channels, num_classes = info.channels, info.num_classes
    size = cfg.data.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, channels, num_classes, vae_only=vae_only).train()
        images = torch.rand(COUNT_BATCH, channels, size, size) * 2 - 1
        labels = torch.arange(COUNT_BATCH) % max(num_classes, 1)
        flops = counted_step_flops(model, images, labels, 0, decoder_scale=0.1)
    return flops * cfg.train.global_batch_size / COUNT_BATCH


def pipeline_flops(cfg: Config, pretrain: Config | None = None) -> dict[str, float]:
    """Counted training FLOPs of a whole pipeline: ``cfg``'s own ``train.steps`` steps and, for
    the frozen modes, the shared VAE's pre-training (``pretrain``, its ``pretrain-vae`` config;
    :func:`simflow.study.pipeline_configs` gives both). Keys ``train``, ``pretrain_vae`` (0 without
    ``pretrain``) and ``total``."""
    out = {"train": cfg.train.steps * step_flops(cfg), "pretrain_vae": 0.0}
    if pretrain is not None:
        out["pretrain_vae"] = pretrain.train.steps * step_flops(pretrain, vae_only=True)
    out["total"] = out["train"] + out["pretrain_vae"]
    return out


def matched_steps(step_flops: float, total_flops: float) -> int:
    """The number of steps of ``step_flops`` each that costs ``total_flops`` (another pipeline's
    :func:`pipeline_flops` total), rounded to the nearest step."""
    return round(total_flops / step_flops)
