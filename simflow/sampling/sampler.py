""":func:`sample`: noise → data through a :class:`~simflow.flow.TransformerFlow`, in one of the
:data:`SAMPLING_MODES`."""

from __future__ import annotations

import torch
from torch import Tensor

from simflow.flow import TransformerFlow, patchify, unpatchify
from simflow.sampling.cache import KVCache, StaticKVCache
from simflow.sampling.guidance import GuidanceStrategy, build_guidance
from simflow.sampling.inverse import (SamplingContext, invert_block_cached, invert_block_jacobi,
                                      invert_block_uncached)
from simflow.sampling.static import compiled_static_step, invert_block_static, static_step

SAMPLING_MODES = ("cached", "static", "compiled", "cuda_graph", "jacobi", "uncached")
"""``cached``: the KV-cached token loop (the plain path); ``static``: the static-shape step, eager;
``compiled``: that step through ``torch.compile``; ``cuda_graph``: that step captured as a CUDA
graph per block and replayed per token (CUDA only); ``jacobi``: block-wise Jacobi, approximate
for a tolerance > 0; ``uncached``: a full causal pass per token, the slow reference."""

CUDA_ONLY_MODES = ("cuda_graph",)

GPU_VERIFIED_MODES: tuple[str, ...] = ()
"""The fast sampling modes a GPU run of this project has verified (equal to ``cached`` on the
GPU and faster there), fastest first: ``auto`` on CUDA picks the first of them, ``cached`` when
there is none. Updated by hand from ``docs/gpu_report.md`` (written by ``scripts/gpu_check.sh``);
until a report exists no GPU has run the fast paths, so a CUDA run takes the plain cached path,
the same one as on CPU. Switching ``auto`` to a verified mode is this one line, e.g.
``("cuda_graph",)``."""


def resolve_mode(mode: str, device: torch.device) -> str:
    """The sampling mode to run on ``device``: ``"auto"`` is ``cached`` on CPU, and on CUDA the
    first of :data:`GPU_VERIFIED_MODES` (``cached`` while that is empty); other modes are checked
    and returned."""
    if mode == "auto":
        if device.type == "cuda" and GPU_VERIFIED_MODES:
            return GPU_VERIFIED_MODES[0]
        return "cached"
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; known: auto, {', '.join(SAMPLING_MODES)}")
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ValueError(f"sampling mode {mode!r} needs CUDA tensors; this run is on {device} "
                         "(use 'auto', 'cached', 'static' or 'compiled')")
    return mode


def sample(flow: TransformerFlow, z: Tensor, y: Tensor | None = None, guidance: float | None = None,
           guidance_method: str | GuidanceStrategy = "linear", attn_temp: float | None = None, *,
           mode: str = "cached", compile_mode: str | None = None,
           jacobi_block_size: int | None = None, jacobi_tol: float = 1e-3, jacobi_max_iter: int = 32,
           stats: dict | None = None, **guidance_options) -> Tensor:
    """Invert the flow: noise z (B, C, H, W) → x, autoregressively token by token, block by block.

    Guidance (``guidance`` = w; ``None`` samples without it, any number, 0 included, runs the
    guided pass): the conditional branch (label ``y``) is contrasted with the null class, run
    under attention temperature ``attn_temp`` when given (unconditional models need it). Both
    branches run batched (2B). ``guidance_method`` names a strategy in
    :data:`~simflow.sampling.guidance.GUIDANCE_STRATEGIES` (options such as ``annealed=True`` or
    ``guide="shift"`` go to its constructor) or is a strategy object.

    ``mode`` is one of :data:`SAMPLING_MODES` or ``"auto"`` (:func:`resolve_mode`); each is tested
    against ``cached`` (docs/performance.md has the tolerances and measurements). Mode options:

    * ``compile_mode`` (``compiled``): the ``torch.compile`` mode, ``"default"`` when None;
      ``"reduce-overhead"`` also uses CUDA graphs.
    * ``jacobi_block_size`` (``jacobi``, required), ``jacobi_tol``, ``jacobi_max_iter``: chunks of
      this many tokens are solved by parallel fixed-point iteration, stopping when no element of
      the chunk changes by more than ``jacobi_tol`` or after ``min(jacobi_max_iter, chunk)``
      iterations (exact for ``jacobi_tol = 0``); one host sync per iteration (the stopping test).
    * ``stats``: a dict to receive sampler statistics (Jacobi: iterations per chunk per block).

    The token loop runs under ``torch.inference_mode`` (no view or version-counter tracking: 12%
    of the CPU time of a guided call at the ml-tarflow comparison size, docs/performance.md); the
    result is cloned out of it, so callers get an ordinary tensor (the Tweedie step takes its
    gradient).
    """
    with torch.inference_mode():
        x = _sample(flow, z, y, guidance, guidance_method, attn_temp, mode, compile_mode,
                    jacobi_block_size, jacobi_tol, jacobi_max_iter, stats, guidance_options)
    return x.clone()


def _sample(flow: TransformerFlow, z: Tensor, y: Tensor | None, guidance: float | None,
            guidance_method: str | GuidanceStrategy, attn_temp: float | None, mode: str,
            compile_mode: str | None, jacobi_block_size: int | None, jacobi_tol: float,
            jacobi_max_iter: int, stats: dict | None, guidance_options: dict) -> Tensor:
    """:func:`sample`'s body, under inference mode."""
    mode = resolve_mode(mode, z.device)
    if compile_mode is not None and mode != "compiled":
        raise ValueError(f"compile_mode is an option of mode 'compiled', not of mode {mode!r}")
    if mode == "jacobi":
        if jacobi_block_size is None or int(jacobi_block_size) < 1 or jacobi_max_iter < 1 or jacobi_tol < 0:
            raise ValueError(f"Jacobi sampling needs jacobi_block_size ≥ 1, jacobi_max_iter ≥ 1 "
                             f"and jacobi_tol ≥ 0; got {jacobi_block_size}, {jacobi_max_iter}, "
                             f"{jacobi_tol}")
    elif jacobi_block_size is not None:
        raise ValueError(f"jacobi_block_size is an option of mode 'jacobi'; it cannot be combined "
                         f"with mode {mode!r}")
    strategy = (build_guidance(guidance_method, **guidance_options)
                if isinstance(guidance_method, str) else guidance_method)
    b = z.shape[0]
    guided = guidance is not None
    if guided and flow.class_embed is None and attn_temp is None:
        raise ValueError("guidance on an unconditional model needs attn_temp (attention-"
                         "temperature guidance); pass e.g. attn_temp=1.5")
    emb = flow.class_embedding(y, b, z.device)
    query_scale = None
    if guided:
        # The unconditional branch is the null class (TarFlow), under attention temperature τ
        # when one is given (the only contrast an unconditional model has).
        uncond_emb = flow.class_embedding(None, b, z.device)
        if attn_temp is not None:
            query_scale = torch.ones(2 * b, 1, 1, 1, device=z.device)
            query_scale[b:] = 1.0 / attn_temp
        emb = None if emb is None else torch.cat([emb, uncond_emb])
    add_cond, ada_cond = flow.conditions(emb)
    ctx = SamplingContext(add_cond, ada_cond, query_scale, strategy, guidance, guided)

    tokens = patchify(z, flow.patch_size)
    param_dtype = next(flow.parameters()).dtype
    cache_dtype = (torch.get_autocast_dtype(z.device.type)
                   if torch.is_autocast_enabled(z.device.type) else param_dtype)
    sizes = (max(flow.layers_per_block), ctx.rows(b), flow.width // flow.head_dim, flow.num_tokens,
             flow.head_dim, z.device, cache_dtype)
    static = mode in ("static", "compiled", "cuda_graph")
    cache = None  # the uncached path needs none
    if static:
        cache = StaticKVCache(*sizes)
    elif mode != "uncached":
        cache = KVCache(*sizes)
    step_fn = static_step if mode == "static" else None  # None: a CUDA graph per block
    if mode == "compiled":
        compile_mode = compile_mode or "default"
        step_fn = compiled_static_step(compile_mode)
        if "cudagraphs" in compile_mode or compile_mode == "reduce-overhead":
            # CUDA-graph trees only replay when mutated inputs keep a fixed address.
            for buffer in cache.keys + cache.values:
                torch._dynamo.mark_static_address(buffer)
    if stats is not None and mode == "jacobi":
        stats["jacobi_iterations"] = []
    for block in reversed(flow.blocks):
        if mode == "uncached":
            tokens = invert_block_uncached(block, tokens, ctx)
        elif mode == "cached":
            tokens = invert_block_cached(block, tokens, cache, ctx)
        elif mode == "jacobi":
            tokens, iters = invert_block_jacobi(block, tokens, cache, ctx, int(jacobi_block_size),
                                                jacobi_tol, jacobi_max_iter)
            if stats is not None:
                stats["jacobi_iterations"].append(iters)
        else:
            tokens = invert_block_static(block, tokens, cache, ctx, step_fn)
    return unpatchify(tokens, flow.in_channels, flow.img_size, flow.img_size, flow.patch_size)
