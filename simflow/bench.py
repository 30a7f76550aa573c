"""`simflow bench`: throughput of the flow's training step, its sampler and FID feature extraction.

What is measured (all on synthetic inputs; weights are random, see ``--weights``):

* **train**: the training stage's own step (:func:`simflow.train.accumulate_gradients` and
  :func:`simflow.train.apply_gradients`) on the flow alone (``model.mode: pixel``, whose loss is the
  flow NLL per dimension), with the study's optimiser (:func:`simflow.train.make_optimizer`: AdamW,
  weight decay on ≥ 2-D weights, fused on CUDA) and gradient clipping, under bf16 autocast on CUDA
  (``--compile-train``: ``TransformerFlow.compile_blocks``, what ``train.compile`` runs). Reported as img/s, and
  as achieved TFLOP/s and MFU against the device's dense bf16 peak (``--peak-tflops`` overrides the
  built-in table). FLOPs per step are counted analytically (:func:`simflow.flops.train_flops`,
  FlashAttention's causal convention: a lower bound).
* **sampling**: images/s of :func:`simflow.sampling.sample` (what the ``sample`` stage runs) in
  several modes (``--modes``):
  ``uncached`` (full causal pass per token, the plain reference), ``cached`` (the default
  preallocated KV cache), ``static`` (static-shape step), ``compiled`` (torch.compile of the static
  step), ``cuda_graph`` (CUDA-graph replay of the static step), ``jacobi`` (block-wise Jacobi) and
  ``baseline`` (:func:`reference_tarflow_reverse`: TarFlow's straightforward sampler with a
  concatenating cache and separate conditional / unconditional passes). Append ``+cfg`` to run a
  mode with classifier-free guidance. Every mode's output is compared with the ``cached`` output of
  the same noise (``max_abs_diff_vs_cached``); Jacobi also reports its iterations.
* **train / sample against a reference** (``--reference MODULE:FACTORY``): the same training step,
  and the sample stage's sampler (``mode="auto"``), of another implementation at the same config,
  timed side by side in this process (calls alternate between the two, medians reported), e.g.
  apple/ml-tarflow's model through a small adapter that the user writes (the project ships no
  reference code). See :func:`bench_train_pair` and :func:`bench_sample_pair` for the protocol.
* **attention**: causal SDPA at the model's training shape (forward + backward) with
  ``is_causal=True``, as the flow calls it, against TarFlow's explicit boolean mask.
* **fid**: images/s of feature extraction through torch-fidelity with the demo's registered
  classifier extractor (``simflow.fid``), and with Inception when its weights are available
  locally (``--inception-weights`` or torch-fidelity's cache). Skipped with a reason otherwise.

Output: a JSON document (``--out`` or stdout) and a one-line summary on stderr.
Run ``python -m simflow.bench --help`` (or ``simflow bench``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simflow import fid as simfid
from simflow.checkpoints import CheckpointError, load_checkpoint
from simflow.classifier import SmallClassifier, save_classifier
from simflow.config import Config, ModelConfig, TrainConfig
from simflow.distributed import DistEnv
from simflow.flops import bf16_peak_tflops, train_flops
from simflow.flow import TransformerFlow, patchify, unpatchify
from simflow.sampling import (SAMPLING_MODES, GuidanceStrategy, KVCache, build_guidance,
                              resolve_mode, sample)
from simflow.model import SimFlowModel
from simflow.train import accumulate_gradients, apply_gradients, make_optimizer

# --------------------------------------------------------------------------------------------
# Model presets
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # A seconds-long CPU run.
    "tiny": dict(in_channels=4, img_size=8, patch_size=1, channels=64, layers_per_block=[1, 1, 2],
                 head_dim=16, num_classes=10, batch=16, sample_batch=8),
    # 256 tokens at a small width: the CPU target (cached ≥ 10× faster than uncached).
    "cpu256": dict(in_channels=4, img_size=16, patch_size=1, channels=64, layers_per_block=[2, 2],
                   head_dim=16, num_classes=10, batch=8, sample_batch=8),
    # The demo study's flow (config defaults: 8×8×4 latents of 32 px Fashion-MNIST).
    "demo": dict(in_channels=4, img_size=8, patch_size=1, channels=128, layers_per_block=[2, 2, 4],
                 head_dim=32, num_classes=10, batch=64, sample_batch=16),
    # The paper's flow (config/config.yaml): 16×16×64 latents of the f16d64 VAE, width 1152, 56 layers.
    "imagenet256": dict(in_channels=64, img_size=16, patch_size=1, channels=1152,
                        layers_per_block=[2, 2, 2, 2, 2, 46], head_dim=64, num_classes=1000,
                        batch=64, sample_batch=64),
    # The CPU side-by-side with apple/ml-tarflow (docs/performance.md): 16×16×4, width 128,
    # 4 blocks × 2 layers, head 64, additive class conditioning, batch 32.
    "tarflow-cpu": dict(in_channels=4, img_size=16, patch_size=1, channels=128,
                        layers_per_block=[2, 2, 2, 2], head_dim=64, num_classes=10,
                        conditioning="add", batch=32, sample_batch=8),
    # TarFlow's ImageNet-64 pixel model: patch 2 (1024 tokens), width 768, 8 blocks × 8 layers.
    "tarflow64": dict(in_channels=3, img_size=64, patch_size=2, channels=768,
                      layers_per_block=[8] * 8, head_dim=64, num_classes=1000, batch=64,
                      sample_batch=16),
}

BASE_MODES = (*SAMPLING_MODES, "baseline")


# --------------------------------------------------------------------------------------------
# The straightforward TarFlow-style sampler (reference for the speed comparison only)
# --------------------------------------------------------------------------------------------
class ConcatKVCache(KVCache):
    """TarFlow's key/value cache: per layer, the new (B, heads, 1, head_dim) keys and values are
    appended with ``torch.cat`` at every token, reallocating and copying the whole cache (O(T²)
    copies per block). Attends through SDPA over everything written so far. Reference for benchmarks and tests; production sampling uses the
    preallocated cache."""

    def __init__(self, layers: int):
        self.keys: list[Tensor | None] = [None] * layers
        self.values: list[Tensor | None] = [None] * layers

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.write(layer, k, v)
        return F.scaled_dot_product_attention(q, keys, values)  # one new position: no mask


@torch.no_grad()
def reference_tarflow_reverse(flow: TransformerFlow, z: Tensor, y: Tensor | None = None,
                              guidance: float | None = None,
                              guidance_method: str | GuidanceStrategy = "linear",
                              attn_temp: float | None = None, **guidance_options) -> Tensor:
    """The straightforward TarFlow-style sampler, NOT used in production: a concatenating cache
    (:class:`ConcatKVCache`), conditional and unconditional branches as two separate batch-B
    passes with one cache each, and the AdaLN modulation recomputed at every token. Same arguments
    and result as :func:`simflow.sampling.sample` (z (B, C, H, W) → x); the baseline of the
    sampling-speed comparison."""
    strategy = (build_guidance(guidance_method, **guidance_options)
                if isinstance(guidance_method, str) else guidance_method)
    guided = guidance is not None
    if guided and flow.class_embed is None and attn_temp is None:
        raise ValueError("guidance on an unconditional model needs attn_temp")
    b = z.shape[0]
    emb_c = flow.class_embedding(y, b, z.device)
    add_c, ada_c = flow.conditions(emb_c)
    add_u = ada_u = scale_u = None
    if guided:
        if attn_temp is not None:
            add_u, ada_u = add_c, ada_c
            scale_u = torch.full((b, 1, 1, 1), 1.0 / attn_temp, device=z.device)
        else:
            add_u, ada_u = flow.conditions(flow.class_embedding(None, b, z.device))
    tokens = patchify(z, flow.patch_size)
    for block in reversed(flow.blocks):
        z_ord = block.order(tokens).float()
        t = z_ord.shape[1]
        x_ord = torch.empty_like(z_ord)
        caches = [ConcatKVCache(len(block.layers)), ConcatKVCache(len(block.layers))]
        token_in = block.sos.expand(b, -1, -1)
        for i in range(t):
            p = block.step(token_in, slice(i, i + 1), caches[0], add_c, ada_c, None)
            if guided:
                p_u = block.step(token_in, slice(i, i + 1), caches[1], add_u, ada_u, scale_u)
                p = strategy(p, p_u, guidance, i, t)
            x_i = z_ord[:, i:i + 1] * torch.exp(p.log_scale) + p.shift
            x_ord[:, i:i + 1] = x_i
            token_in = block.embed(x_i)
        tokens = block.order(x_ord).to(z.dtype)
    return unpatchify(tokens, flow.in_channels, flow.img_size, flow.img_size, flow.patch_size)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """Preset merged with explicit overrides → TransformerFlow kwargs plus batch sizes."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; known: {sorted(PRESETS)}")
    cfg = dict(PRESETS[args.preset])
    overrides = dict(in_channels=args.in_channels, img_size=args.img_size, patch_size=args.patch,
                     channels=args.channels, layers_per_block=args.layers, head_dim=args.head_dim,
                     num_classes=args.num_classes, batch=args.batch, sample_batch=args.sample_batch,
                     conditioning=getattr(args, "conditioning", None), gelu=getattr(args, "gelu", None))
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["img_size"] % cfg["patch_size"]:
        raise ValueError(f"--img-size {cfg['img_size']} is not divisible by --patch {cfg['patch_size']}")
    if cfg["channels"] % cfg["head_dim"]:
        raise ValueError(f"--channels {cfg['channels']} is not divisible by --head-dim {cfg['head_dim']}")
    return cfg


def build_flow(cfg: dict[str, Any], weights: str, device: torch.device, seed: int) -> TransformerFlow:
    """The benchmarked flow. ``weights="random"`` gives the zero-initialised output projections and
    AdaLN maps small random values (std 0.02), so blocks are not the identity (which would make
    Jacobi converge in one pass and hide the sampler's real work); ``"init"`` keeps the init."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if k not in ("batch", "sample_batch")}
    flow = TransformerFlow(**kwargs)
    if weights == "random":
        with torch.no_grad():
            for name, param in flow.named_parameters():
                if "proj_out" in name or "modulation" in name:
                    param.normal_(0.0, 0.02)
    elif weights != "init":
        raise ValueError(f"--weights must be 'random' or 'init', got {weights!r}")
    return flow.to(device)


def load_flow_weights(flow: TransformerFlow, path: str, key: str) -> None:
    """Load trained flow weights: a ``simflow train`` checkpoint (``key`` = ``ema`` or ``model``; the
    flow's entries are those prefixed ``flow.``) or a plain flow state dict. The model options must
    match the checkpoint's flow (a mismatch raises, naming the differing entries)."""

    if not Path(path).is_file():
        raise ValueError(f"--checkpoint {path}: no such file (a train stage writes "
                         "<run_dir>/checkpoints/latest.pt)")
    try:  # the stages' reader, so a bad file gets the same message as there
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--checkpoint: {err}; pass a complete checkpoint (a train stage writes "
                              "<run_dir>/checkpoints/latest.pt and previous.pt)") from None
    state = ckpt
    if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
        state = ckpt[key]
    if any(k.startswith("flow.") for k in state):
        state = {k[len("flow."):]: v for k, v in state.items() if k.startswith("flow.")}
    try:
        flow.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"--checkpoint {path}: its flow does not match the benchmarked model; pass the "
                         f"checkpoint's --in-channels/--img-size/--patch/--channels/--layers/--head-dim/"
                         f"--num-classes. {err}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
          ) -> tuple[list[float], list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times. Returns the wall seconds and the
    process CPU seconds of each timed run (device synchronised around each) and the last result.

    On a shared CPU the wall time includes waiting for other processes; the process CPU time of a
    single-threaded run (``--threads 1``) does not, so it is the steadier figure there."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu, result


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------
def train_batch(flow: TransformerFlow, batch: int, seed: int, device: torch.device
                ) -> tuple[Tensor, Tensor | None]:
    """The synthetic training batch: x (B, C, H, W) standard normal, labels 0, 1, … mod classes."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, flow.in_channels, flow.img_size, flow.img_size, generator=gen).to(device)
    y = (torch.arange(batch) % flow.num_classes).to(device) if flow.num_classes else None
    return x, y


def train_step(model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device,
               amp: str) -> Callable[[], Tensor]:
    """One optimisation step of ``loss_fn()`` (forward under ``amp``, backward, AdamW with TarFlow's
    betas (0.9, 0.95) and weight decay 1e-4, fused on CUDA) over ``model``'s parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4,
                            fused=device.type == "cuda")

    def step() -> Tensor:
        with autocast_context(device, amp):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def flow_loss(flow: TransformerFlow, x: Tensor, y: Tensor | None) -> Callable[[], Tensor]:
    """The flow NLL per dimension (the study's training objective of the flow)."""
    def loss() -> Tensor:
        z, logdet = flow(x, y)
        return flow.nll_from(z, logdet).mean() / flow.num_dims
    return loss


def study_train_step(flow: TransformerFlow, x: Tensor, y: Tensor | None, device: torch.device,
                     amp: str) -> Callable[[], Tensor]:
    """One step of the training stage on ``flow`` and the batch (x, y): the flow wrapped as the
    study's model in ``pixel`` mode (loss: the flow NLL per dimension), trained by the loop's own
    :func:`simflow.train.accumulate_gradients` and :func:`simflow.train.apply_gradients` with its
    optimiser (``train.*`` defaults, lr 1e-4). ``amp`` is ``bf16`` or ``none`` (``train.precision``
    has no fp16). Returns the step, which returns the (detached) loss."""
    if amp not in ("bf16", "none"):
        raise ValueError(f"--amp {amp}: the training stage runs in bf16 or fp32 (train.precision); "
                         "use --amp bf16 or --amp none")
    cfg = Config(model=ModelConfig(mode="pixel"),
                 train=TrainConfig(lr=1e-4, precision="bf16" if amp == "bf16" else "fp32"))
    model = SimFlowModel(cfg.model, flow)
    optimizers = {"flow": make_optimizer(model.parameter_groups()["flow"], cfg.train.lr, cfg, device)}
    env = DistEnv(device=device)
    # the loop always has labels; an unconditional flow ignores them
    labels = y if y is not None else torch.zeros(len(x), dtype=torch.long, device=device)

    def step() -> Tensor:
        terms, _ = accumulate_gradients(model, x, labels, 0, cfg, len(x))
        apply_gradients(optimizers, cfg, env)
        return terms["total"]

    return step


def bench_train(flow: TransformerFlow, cfg: dict[str, Any], args: argparse.Namespace,
                device: torch.device, amp: str) -> dict[str, Any]:
    """Training-step throughput of the training stage's step (:func:`study_train_step`)."""
    batch = cfg["batch"]
    flow.train()
    if args.compile_train:
        flow.compile_blocks(**({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
    fused = device.type == "cuda"
    x, y = train_batch(flow, batch, args.seed, device)
    step = study_train_step(flow, x, y, device, amp)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_start = time.perf_counter()
    step()  # first step: allocator warm-up (and compilation with --compile-train)
    synchronize(device)
    first_step_s = time.perf_counter() - compile_start
    times, cpu_times, loss = timed(step, device, args.steps, max(args.warmup - 1, 0))
    sec = min(times)
    flops = train_flops(flow, batch)
    achieved = flops["total_flops"] / sec / 1e12
    peak = args.peak_tflops if args.peak_tflops else bf16_peak_tflops(device)
    out = {
        "batch": batch, "amp": amp, "compiled": bool(args.compile_train), "fused_adamw": fused,
        "first_step_s": first_step_s, "step_s": sec, "step_s_median": statistics.median(times),
        "step_s_all": times, "step_cpu_s": min(cpu_times),
        "img_per_s": batch / sec, "tokens_per_s": batch * flow.num_tokens / sec,
        "loss": float(loss), **flops, "achieved_tflops": achieved,
        "peak_bf16_tflops": peak, "mfu": (achieved / peak) if peak else None,
    }
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    flow.eval()
    return out


def load_reference(spec: str, paths: list[str] | None = None) -> Callable[[dict[str, Any]], nn.Module]:
    """The factory named by ``spec`` = ``"module:attribute"`` (``module`` importable, after
    prepending ``paths`` to ``sys.path``; ``attribute`` may be dotted). Imported at run time only:
    the project ships no reference implementation."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--reference {spec!r}: expected MODULE:FACTORY, e.g. tarflow_adapter:build")
    for path in reversed(paths or []):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--reference {spec!r}: cannot import {module_name!r} ({err}); put it on "
                         "--reference-path or PYTHONPATH") from err
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ValueError(f"--reference {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"--reference {spec!r}: {attribute!r} is not callable")
    return target


def reference_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config a reference factory receives: the benchmarked flow's sizes, its conditioning
    ("adaln"/"add", "none" without classes) and the training batch (plain values)."""
    keys = ("in_channels", "img_size", "patch_size", "channels", "head_dim", "num_classes", "batch")
    out = {k: cfg[k] for k in keys}
    out["layers_per_block"] = list(cfg["layers_per_block"])
    out["conditioning"] = cfg.get("conditioning", "adaln") if cfg["num_classes"] else "none"
    return out


def bench_train_pair(flow: TransformerFlow, cfg: dict[str, Any], args: argparse.Namespace,
                     device: torch.device, amp: str) -> dict[str, Any]:
    """This flow's training step against a reference implementation's, side by side.

    Protocol of a reference: ``--reference MODULE:FACTORY``; ``FACTORY(config)`` gets
    :func:`reference_config` (a dict: in_channels, img_size, patch_size, channels,
    layers_per_block, head_dim, num_classes, conditioning, batch) and returns an ``nn.Module``
    whose ``forward(x, y)`` returns the scalar training loss of the batch x (B, C, H, W) with labels
    y (B,) (None for unconditional models). Both models train on the same batch with the same
    optimiser (:func:`train_step`). After ``--warmup`` steps of each, ``--pair-repeats`` rounds
    run one step of each, alternating which goes first, each timed in wall and process CPU time.
    Reported: medians, and ``speed_ratio`` = reference median / this flow's median (> 1: this flow
    is faster), in CPU time and wall time, plus the median of the per-round ratios.

    Ratios are robust to background load on a shared machine (both sides see it alike); absolute
    times are not. On a CPU, ``--threads 1`` makes the CPU-time figures the steadier ones."""
    factory = load_reference(args.reference, args.reference_path)
    ref_cfg = reference_config(cfg)
    torch.manual_seed(args.seed)
    reference = factory(dict(ref_cfg))
    if not isinstance(reference, nn.Module):
        raise ValueError(f"--reference {args.reference}: the factory returned "
                         f"{type(reference).__name__}, not a torch.nn.Module")
    reference = reference.to(device).train()
    flow.train()
    x, y = train_batch(flow, cfg["batch"], args.seed, device)
    steps = {"simflow": train_step(flow, flow_loss(flow, x, y), device, amp),
             "reference": train_step(reference, lambda: reference(x, y), device, amp)}
    losses = {}
    for name, step in steps.items():
        for _ in range(max(args.warmup, 1)):
            loss = step()
        synchronize(device)
        losses[name] = float(loss)
        if not torch.isfinite(loss):
            raise ValueError(f"--reference {args.reference}: the {name} loss is {float(loss)}")
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.pair_repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            w, c, _ = timed(steps[name], device, 1, 0)
            wall[name] += w
            cpu[name] += c
    med = {kind: {name: statistics.median(v[name]) for name in steps}
           for kind, v in (("wall", wall), ("cpu", cpu))}
    per_round = [r / s for r, s in zip(cpu["reference"], cpu["simflow"], strict=True)]
    return {
        "reference": args.reference, "reference_config": ref_cfg, "batch": cfg["batch"], "amp": amp,
        "rounds": args.pair_repeats, "order": "alternating, one step of each per round",
        "params": {"simflow": sum(p.numel() for p in flow.parameters()),
                   "reference": sum(p.numel() for p in reference.parameters())},
        "loss_after_warmup": losses,
        "step_s_median": med["wall"], "step_cpu_s_median": med["cpu"],
        "step_s_all": wall, "step_cpu_s_all": cpu,
        "speed_ratio_cpu": med["cpu"]["reference"] / med["cpu"]["simflow"],
        "speed_ratio_wall": med["wall"]["reference"] / med["wall"]["simflow"],
        "speed_ratio_cpu_per_round_median": statistics.median(per_round),
        "note": "speed_ratio = reference step time / simflow step time (> 1: simflow is faster); "
                "ratios are robust to background load, absolute times are not",
    }


def bench_sample_pair(flow: TransformerFlow, cfg: dict[str, Any], args: argparse.Namespace,
                      device: torch.device, amp: str) -> dict[str, Any]:
    """The sample stage's sampler (:func:`simflow.sampling.sample`, ``mode="auto"``) against a
    reference implementation's, side by side, at the same config and batch.

    Protocol: the ``--reference`` factory of :func:`bench_train_pair`; the module it returns also
    has ``sample(z, y, guidance)``, which inverts noise z (B, C, H, W) with labels y (B,) (None
    for unconditional models) under CFG weight ``guidance`` (0: none) and returns x (B, C, H, W).
    Both run the ``--guidance`` weight (simflow: both branches batched; ``--guidance 0`` samples
    without guidance). After ``--sample-warmup`` calls of each, ``--pair-repeats`` rounds run one
    call of each, alternating which goes first, timed in wall and process CPU time; reported as
    medians and ``speed_ratio`` = reference / simflow (> 1: simflow is faster). The weights of
    the two models differ (each its own random init), which does not change the work."""
    factory = load_reference(args.reference, args.reference_path)
    ref_cfg = reference_config(cfg)
    torch.manual_seed(args.seed)
    reference = factory(dict(ref_cfg))
    if not callable(getattr(reference, "sample", None)):
        raise ValueError(f"--reference {args.reference}: the factory's module has no "
                         "sample(z, y, guidance) method (needed by --parts sample)")
    if isinstance(reference, nn.Module):
        reference = reference.to(device).eval()
    flow.eval()
    b = cfg["sample_batch"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    z = torch.randn(b, flow.in_channels, flow.img_size, flow.img_size, generator=gen).to(device)
    y = (torch.arange(b) % flow.num_classes).to(device) if flow.num_classes else None
    w = args.guidance
    guide: dict[str, Any] = {} if w == 0 else dict(guidance=w, guidance_method=args.guidance_method)
    if w and flow.num_classes == 0:
        guide["attn_temp"] = args.attn_temp
    calls = {"simflow": lambda: sample(flow, z, y, mode="auto", **guide),
             "reference": lambda: reference.sample(z.clone(), y, w)}
    with autocast_context(device, amp):
        for name, fn in calls.items():
            for _ in range(max(args.sample_warmup, 1)):
                x = fn()
            if tuple(x.shape) != tuple(z.shape) or not torch.isfinite(x).all():
                raise ValueError(f"--reference {args.reference}: the {name} sampler returned "
                                 f"{tuple(x.shape)} (finite: {bool(torch.isfinite(x).all())}), "
                                 f"expected finite {tuple(z.shape)}")
        synchronize(device)
        wall: dict[str, list[float]] = {name: [] for name in calls}
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for r in range(args.pair_repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                ws, cs, _ = timed(calls[name], device, 1, 0)
                wall[name] += ws
                cpu[name] += cs
    med = {kind: {name: statistics.median(v[name]) for name in calls}
           for kind, v in (("wall", wall), ("cpu", cpu))}
    per_round = [r / s for r, s in zip(cpu["reference"], cpu["simflow"], strict=True)]
    return {
        "reference": args.reference, "reference_config": ref_cfg, "sample_batch": b,
        "guidance": w, "simflow_mode": resolve_mode("auto", device), "amp": amp,
        "rounds": args.pair_repeats, "order": "alternating, one call of each per round",
        "call_s_median": med["wall"], "call_cpu_s_median": med["cpu"],
        "call_s_all": wall, "call_cpu_s_all": cpu,
        "speed_ratio_cpu": med["cpu"]["reference"] / med["cpu"]["simflow"],
        "speed_ratio_wall": med["wall"]["reference"] / med["wall"]["simflow"],
        "speed_ratio_cpu_per_round_median": statistics.median(per_round),
        "note": "speed_ratio = reference call time / simflow call time (> 1: simflow is faster)",
    }


def parse_mode(mode: str) -> tuple[str, bool]:
    base, _, suffix = mode.partition("+")
    if base not in BASE_MODES or suffix not in ("", "cfg"):
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {', '.join(BASE_MODES)}, "
                         "optionally with '+cfg'")
    return base, suffix == "cfg"


def default_modes(device: torch.device, tokens: int, jacobi: bool) -> list[str]:
    if device.type == "cuda":
        modes = ["cached", "static", "cuda_graph", "cached+cfg", "cuda_graph+cfg",
                 "baseline", "baseline+cfg"]
    else:
        modes = ["cached", "static", "cached+cfg", "baseline", "baseline+cfg"]
        if tokens <= 256:  # the plain path costs ~T/2 × the cached one
            modes.insert(0, "uncached")
    if jacobi:
        modes += ["jacobi", "jacobi+cfg"]
    return modes


def bench_sampling(flow: TransformerFlow, cfg: dict[str, Any], args: argparse.Namespace,
                   device: torch.device, amp: str) -> dict[str, Any]:
    """Images/s of every requested sampling mode, with its deviation from the cached sampler."""
    flow.eval()
    b = cfg["sample_batch"]
    modes = args.modes.split(",") if args.modes else default_modes(
        device, flow.num_tokens, args.jacobi_block_size is not None)
    parsed = [parse_mode(m.strip()) for m in modes]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    z = torch.randn(b, flow.in_channels, flow.img_size, flow.img_size, generator=gen).to(device)
    y = (torch.arange(b) % flow.num_classes).to(device) if flow.num_classes else None
    guide: dict[str, Any] = dict(guidance=args.guidance, guidance_method=args.guidance_method)
    if flow.num_classes == 0:
        guide["attn_temp"] = args.attn_temp
    if args.annealed:
        guide["annealed"] = True

    def sampler(base: str, cfg_on: bool, stats: dict) -> Callable[[], Tensor]:
        kwargs = dict(guide) if cfg_on else {}
        if base == "baseline":
            return lambda: reference_tarflow_reverse(flow, z, y, **kwargs)
        options = {"compiled": dict(compile_mode=args.sampling_compile_mode),
                   "jacobi": dict(jacobi_block_size=args.jacobi_block_size, jacobi_tol=args.jacobi_tol,
                                  jacobi_max_iter=args.jacobi_max_iter, stats=stats)}.get(base, {})
        if base == "jacobi" and args.jacobi_block_size is None:
            raise ValueError("sampling mode 'jacobi' needs --jacobi-block-size")
        return lambda: sample(flow, z, y, mode=base, **kwargs, **options)

    references: dict[bool, Tensor] = {}
    runs: dict[str, dict[str, Any]] = {}
    with autocast_context(device, amp):
        for (base, cfg_on), name in zip(parsed, modes, strict=True):
            if cfg_on not in references:
                references[cfg_on] = sampler("cached", cfg_on, {})().float()
            stats: dict = {}
            # The plain path costs ~T/2 × the cached one: one timed run, no warm-up.
            warmup = 0 if base == "uncached" else args.sample_warmup
            start = time.perf_counter()
            fn = sampler(base, cfg_on, stats)
            for _ in range(warmup):  # compilation / graph capture / allocator warm-up
                fn()
            synchronize(device)
            runs[name] = dict(base=base, cfg=cfg_on, fn=fn, stats=stats, warmup=warmup,
                              warmup_s=time.perf_counter() - start, wall=[], cpu=[], x=None)
        # Timed runs go round-robin over the modes, so a load change on a shared machine hits
        # every mode alike rather than whichever mode happened to run then.
        for rep in range(args.sample_repeats):
            for run in runs.values():
                if run["base"] == "uncached" and rep > 0:
                    continue
                wall, cpu, run["x"] = timed(run["fn"], device, 1, 0)
                run["wall"] += wall
                run["cpu"] += cpu
    results: dict[str, Any] = {}
    for name, run in runs.items():
        ref = references[run["cfg"]]
        x, sec = run["x"], min(run["wall"])
        diff = (x.float() - ref).abs()
        entry = {"seconds": sec, "seconds_median": statistics.median(run["wall"]),
                 "seconds_all": run["wall"], "cpu_seconds": min(run["cpu"]), "img_per_s": b / sec,
                 "warmup_runs": run["warmup"], "warmup_s": run["warmup_s"],
                 "max_abs_diff_vs_cached": float(diff.max()),
                 "rms_diff_vs_cached": float(diff.pow(2).mean().sqrt()),
                 "finite": bool(torch.isfinite(x).all())}
        if run["base"] == "jacobi":
            iters = [i for block in run["stats"]["jacobi_iterations"] for i in block]
            entry.update(block_size=args.jacobi_block_size, tol=args.jacobi_tol,
                         max_iter=args.jacobi_max_iter, mean_iterations=statistics.mean(iters),
                         parallel_passes=sum(iters),
                         sequential_steps=flow.num_tokens * len(flow.blocks),
                         rel_rms_error=float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()))
        results[name] = entry
    speedups: dict[str, float] = {}
    cpu_speedups: dict[str, float] = {}

    def ratio(slow: str, fast: str) -> None:
        if slow in results and fast in results:
            speedups[f"{fast}_vs_{slow}"] = results[slow]["seconds"] / results[fast]["seconds"]
            cpu_speedups[f"{fast}_vs_{slow}"] = results[slow]["cpu_seconds"] / results[fast]["cpu_seconds"]

    ratio("uncached", "cached")
    for fast in ("static", "compiled", "cuda_graph", "jacobi"):
        ratio("cached", fast)
        ratio("cached+cfg", fast + "+cfg")
    for mode in results:
        if mode.endswith("+cfg") and not mode.startswith("baseline"):
            ratio("baseline+cfg", mode)
        elif not mode.startswith(("baseline", "uncached")) and "+" not in mode:
            ratio("baseline", mode)
    out = {"batch": b, "amp": amp, "tokens": flow.num_tokens, "guidance": guide, "modes": results,
           "timing": "seconds = fastest of the timed runs (wall); speedups are ratios of it",
           "speedups": speedups}
    if device.type == "cpu":
        out["speedups_cpu_time"] = cpu_speedups
    return out


def bench_attention(flow: TransformerFlow, cfg: dict[str, Any], args: argparse.Namespace,
                    device: torch.device, amp: str) -> dict[str, Any]:
    """Causal SDPA at the model's training shape, forward + backward: ``is_causal=True`` (no mask,
    what the flow uses; flash-eligible) against TarFlow's explicit boolean ``tril`` mask."""
    b, t = cfg["batch"], flow.num_tokens
    heads, hd = flow.width // flow.head_dim, flow.head_dim
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[amp]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    q, k, v = (torch.randn(b, heads, t, hd, generator=gen).to(device, dtype).requires_grad_(True)
               for _ in range(3))
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    fn = torch.nn.functional.scaled_dot_product_attention

    def run(**kwargs) -> Tensor:
        out = fn(q, k, v, **kwargs)
        out.sum().backward()
        return out.detach()

    results = {}
    for name, kwargs in (("is_causal", {"is_causal": True}), ("explicit_mask", {"attn_mask": mask})):
        times, _, out = timed(lambda kwargs=kwargs: run(**kwargs), device, args.steps, 1)
        results[name] = {"seconds": min(times)}
        results[name]["output"] = out
    diff = (results["is_causal"].pop("output").float() - results["explicit_mask"].pop("output").float())
    return {"shape": [b, heads, t, hd], "dtype": str(dtype).replace("torch.", ""), **results,
            "speedup_is_causal": results["explicit_mask"]["seconds"] / results["is_causal"]["seconds"],
            "max_abs_diff": float(diff.abs().max())}


def bench_fid(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Feature-extraction throughput through torch-fidelity: the demo classifier's extractor, and
    Inception when its weights are available locally (skipped, with the reason, otherwise)."""
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the fid benchmark needs it
    from torch_fidelity.utils import create_feature_extractor

    cuda = device.type == "cuda"
    n = args.fid_images
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"images": n, "batch": args.fid_batch}
    with tempfile.TemporaryDirectory() as tmp:
        images = rng.integers(0, 256, size=(n, 32, 32, 1), dtype=np.uint8)
        ckpt = save_classifier(SmallClassifier(in_channels=1, image_size=32),
                               Path(tmp) / "bench_classifier.pt")
        name = simfid.register_classifier_extractor(ckpt, name="simflow-bench-classifier")
        extractors = [("classifier", name, None, images)]
        weights = Path(args.inception_weights) if args.inception_weights else simfid.inception_weights_cache_path()
        if weights.is_file():
            extractors.append(("inception", simfid.INCEPTION_EXTRACTOR_NAME, str(weights),
                               rng.integers(0, 256, size=(min(n, args.inception_images), 32, 32, 3),
                                            dtype=np.uint8)))
        else:
            out["inception"] = {"skipped": f"no Inception weights at {weights} (pass --inception-weights)"}
        for label, ext_name, path, data in extractors:
            try:
                kwargs = {} if path is None else {"feature_extractor_weights_path": path}
                fe = create_feature_extractor(ext_name, ["2048" if label == "inception" else "features"],
                                              cuda=cuda, verbose=False, **kwargs)
                simfid.extract_features(data[:2 * args.fid_batch], fe, args.fid_batch, cuda)  # warm-up
                def extract(data=data, fe=fe):
                    return simfid.extract_features(data, fe, args.fid_batch, cuda)

                times, _, _ = timed(extract, device, 1, 0)
                out[label] = {"extractor": ext_name, "images": len(data), "seconds": times[0],
                              "img_per_s": len(data) / times[0]}
            except Exception as err:  # report, do not fail the whole benchmark
                out[label] = {"skipped": f"{type(err).__name__}: {err}"}
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``simflow bench``."""
    m = parser.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="model size: tiny (CPU, seconds), cpu256 (256 tokens, CPU target), demo, "
                        "imagenet256 (the paper's flow, GPU), tarflow64 (TarFlow ImageNet-64, GPU)")
    m.add_argument("--channels", type=int, help="transformer width (overrides the preset)")
    m.add_argument("--layers", type=_int_list, help="layers per block, e.g. 2,2,2,2,2,46")
    m.add_argument("--img-size", type=int, help="H = W of the modelled map")
    m.add_argument("--in-channels", type=int, help="channels of the modelled map")
    m.add_argument("--patch", type=int, help="patch size")
    m.add_argument("--head-dim", type=int, help="attention head size")
    m.add_argument("--num-classes", type=int, help="0 = unconditional (CFG uses attention temperature)")
    m.add_argument("--conditioning", choices=["adaln", "add"],
                   help="class conditioning: adaln (DiT-style) or add (TarFlow; preset tarflow-cpu)")
    m.add_argument("--gelu", choices=["none", "tanh"],
                   help="the MLPs' GELU: none = exact (default), tanh = the tanh approximation")
    m.add_argument("--weights", default="random", choices=["random", "init"],
                   help="random: non-identity blocks (default); init: the zero-initialised model")
    m.add_argument("--checkpoint", help="load trained flow weights (simflow train checkpoint or a flow "
                   "state dict); give the matching model options. Jacobi convergence and error are "
                   "only meaningful with trained weights")
    m.add_argument("--checkpoint-key", default="ema", choices=["ema", "model"],
                   help="which weights of a simflow train checkpoint")
    r = parser.add_argument_group("run")
    r.add_argument("--parts", default="train,sample,attention,fid",
                   help="comma list of train, sample, attention, fid (default: all)")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    r.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU)")
    r.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="write the JSON here (default: stdout)")
    t = parser.add_argument_group("training step")
    t.add_argument("--batch", type=int, help="training batch (preset default)")
    t.add_argument("--steps", type=int, default=5, help="timed steps (the fastest counts)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps, the first included")
    t.add_argument("--compile-train", action="store_true", help="torch.compile every flow block")
    t.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for --compile-train (default, max-autotune, …)")
    t.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: bf16 table)")
    t.add_argument("--reference", metavar="MODULE:FACTORY",
                   help="also time another implementation side by side: FACTORY(config) returns an "
                        "nn.Module whose forward(x, y) is the training loss (--parts train) and whose "
                        "sample(z, y, guidance) inverts noise (--parts sample; see docs/performance.md)")
    t.add_argument("--reference-path", action="append", default=[], metavar="DIR",
                   help="prepended to sys.path before importing --reference (repeatable)")
    t.add_argument("--pair-repeats", type=int, default=10,
                   help="rounds of the side-by-side timing (one step or sampling call of each per round)")
    s = parser.add_argument_group("sampling")
    s.add_argument("--sample-batch", type=int, help="sampling batch (preset default)")
    s.add_argument("--modes", help="comma list of " + ", ".join(BASE_MODES)
                   + ", each optionally +cfg (default: depends on the device)")
    s.add_argument("--sample-repeats", type=int, default=3, help="timed runs per mode (fastest counts)")
    s.add_argument("--sample-warmup", type=int, default=1, help="untimed runs per mode (not uncached)")
    s.add_argument("--guidance", type=float, default=1.5, help="CFG weight of the +cfg modes")
    s.add_argument("--guidance-method", default="linear", help="guidance strategy name")
    s.add_argument("--annealed", action="store_true", help="annealed guidance weight")
    s.add_argument("--attn-temp", type=float, default=1.5,
                   help="attention temperature of CFG for unconditional models")
    s.add_argument("--sampling-compile-mode", default="default",
                   help="torch.compile mode of the 'compiled' mode (reduce-overhead: CUDA graphs)")
    s.add_argument("--jacobi-block-size", type=int, help="enables the jacobi modes")
    s.add_argument("--jacobi-tol", type=float, default=1e-3)
    s.add_argument("--jacobi-max-iter", type=int, default=32)
    f = parser.add_argument_group("FID feature extraction")
    f.add_argument("--fid-images", type=int, default=512)
    f.add_argument("--fid-batch", type=int, default=128)
    f.add_argument("--inception-weights", help="local Inception weights file (optional)")
    f.add_argument("--inception-images", type=int, default=128)


def summary_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    parts = [f"{cfg['preset']} ({cfg['params'] / 1e6:.2f}M params, {cfg['tokens']} tokens) "
             f"on {result['device']['name']}"]
    pair = result.get("train_vs_reference")
    if pair:
        parts.append(f"train vs {pair['reference']}: {pair['speed_ratio_cpu']:.3f}x (CPU time), "
                     f"{pair['speed_ratio_wall']:.3f}x (wall)")
    pair = result.get("sample_vs_reference")
    if pair:
        parts.append(f"sampling (auto, w={pair['guidance']}) vs {pair['reference']}: "
                     f"{pair['speed_ratio_cpu']:.3f}x (CPU time), {pair['speed_ratio_wall']:.3f}x (wall)")
    train = result.get("train")
    if train:
        text = f"train {train['img_per_s']:.1f} img/s, {train['achieved_tflops']:.3g} TFLOP/s"
        if train.get("mfu") is not None:
            text += f", MFU {100 * train['mfu']:.1f}%"
        parts.append(text)
    sample = result.get("sample")
    if sample:
        modes = ", ".join(f"{k} {v['img_per_s']:.2f}" for k, v in sample["modes"].items())
        parts.append(f"sampling img/s: {modes}")
        key = next((k for k in ("cached_vs_uncached",) if k in sample["speedups"]), None)
        if key:
            parts.append(f"cached/uncached {sample['speedups'][key]:.1f}x")
        best = [v for k, v in sample["speedups"].items() if k.endswith("+cfg_vs_baseline+cfg")]
        if best:
            parts.append(f"best CFG vs baseline {max(best):.2f}x")
    attention = result.get("attention")
    if attention:
        parts.append(f"is_causal vs explicit mask {attention['speedup_is_causal']:.2f}x")
    fid = result.get("fid")
    if fid and "classifier" in fid and "img_per_s" in fid["classifier"]:
        parts.append(f"FID features {fid['classifier']['img_per_s']:.0f} img/s")
    return "; ".join(parts)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns the exit code."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"train", "sample", "attention", "fid"}
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; use train, sample, attention, fid")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(args)
    flow = build_flow(cfg, args.weights, device, args.seed)
    if args.checkpoint:
        load_flow_weights(flow, args.checkpoint, args.checkpoint_key)
    result: dict[str, Any] = {
        "config": {"preset": args.preset, **cfg, "tokens": flow.num_tokens,
                   "token_dim": flow.token_dim,
                   "params": sum(p.numel() for p in flow.parameters()),
                   "weights": args.checkpoint or args.weights},
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else (platform.processor() or platform.machine()),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": platform.python_version()},
    }
    if "sample" in parts:  # before training, so the sampled weights are the built ones
        if args.reference:
            result["sample_vs_reference"] = bench_sample_pair(flow, cfg, args, device, amp)
        result["sample"] = bench_sampling(flow, cfg, args, device, amp)
    if "train" in parts and args.reference:  # before bench_train, which may compile the flow
        result["train_vs_reference"] = bench_train_pair(flow, cfg, args, device, amp)
    if "train" in parts:
        result["train"] = bench_train(flow, cfg, args, device, amp)
    if "attention" in parts:
        result["attention"] = bench_attention(flow, cfg, args, device, amp)
    if "fid" in parts:
        result["fid"] = bench_fid(args, device)
    result["summary"] = summary_line(result)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(result["summary"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m simflow.bench", description=__doc__.split("\n")[0],
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
