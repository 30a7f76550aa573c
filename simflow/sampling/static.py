"""The static-shape token step and its fast forms: eager, ``torch.compile`` d, or captured as a CUDA
graph per block and replayed per token.

Every step has identical shapes (a full-length :class:`StaticKVCache` under a mask, the position as
a tensor), so one compiled artefact serves every token, and every block of the same depth.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from simflow.flow import FlowBlock, StepParams
from simflow.sampling.cache import StaticKVCache
from simflow.sampling.inverse import SamplingContext, token_loop

Modulations = list[tuple[Tensor, ...]] | None


def static_step(block: FlowBlock, token_in: Tensor, position: Tensor, cache: StaticKVCache,
                add_cond: Tensor | None, query_scale: Tensor | None,
                modulations: Modulations) -> tuple[Tensor, Tensor]:
    """(shift, log_scale), each (B, 1, D) fp32, of the (1,) long tensor ``position`` from its
    transformer input ``token_in`` (B, 1, width). The unit that is compiled or captured: a free
    function of tensors (AdaLN enters through ``modulations``, the condition is not an argument)."""
    p = block.step(token_in, position, cache.at(position), add_cond, None, query_scale, modulations)
    return p.shift, p.log_scale


_COMPILED_STEPS: dict[str, Callable] = {}


def compiled_static_step(mode: str = "default") -> Callable:
    """``torch.compile`` of :func:`static_step` with static shapes, built once per mode and
    process (``"reduce-overhead"`` adds CUDA graphs on GPU)."""
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(static_step, mode=None if mode == "default" else mode,
                                              dynamic=False)
    return _COMPILED_STEPS[mode]


class CUDAGraphStep:
    """One flow block's static-shape token step captured once as a CUDA graph and replayed per
    token. Inputs are copied into static buffers (``token_in`` (B, 1, width), ``position`` (1,));
    the returned (shift, log_scale) are the graph's static outputs, overwritten by the next replay.
    Capture happens under the caller's autocast settings (with the autocast weight cache off, as
    graph capture requires)."""

    def __init__(self, block: FlowBlock, cache: StaticKVCache, add_cond: Tensor | None,
                 query_scale: Tensor | None, modulations: Modulations,
                 token_shape: tuple[int, ...], token_dtype: torch.dtype):
        device = cache.keys[0].device
        if device.type != "cuda":
            raise ValueError("CUDA-graph sampling needs the model and noise on a CUDA device")
        self.token_in = torch.zeros(token_shape, device=device, dtype=token_dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._args = (block, cache, add_cond, query_scale, modulations)  # kept alive with the graph
        amp = torch.is_autocast_enabled("cuda")
        amp_dtype = torch.get_autocast_dtype("cuda")

        def run() -> tuple[Tensor, Tensor]:
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp, cache_enabled=False):
                return static_step(block, self.token_in, self.position, cache, add_cond,
                                   query_scale, modulations)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (lazy inits, kernel selection)
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run()

    def __call__(self, token_in: Tensor, position: Tensor) -> tuple[Tensor, Tensor]:
        self.token_in.copy_(token_in)
        self.position.copy_(position)
        self.graph.replay()
        return self.outputs


def invert_block_static(block: FlowBlock, z_tokens: Tensor, cache: StaticKVCache,
                        ctx: SamplingContext, step_fn: Callable | None) -> Tensor:
    """The token loop with identical shapes at every step; ``step_fn`` is :func:`static_step`,
    its compiled form, or None for a per-block CUDA graph (:class:`CUDAGraphStep`)."""
    mods = block.modulations(ctx.ada_cond)
    # detach + contiguous: the first input must look like the later ones (no requires_grad,
    # which a parameter's view keeps under no_grad; no 0-stride), or torch.compile recompiles.
    token_in = block.sos.detach().expand(ctx.rows(z_tokens.shape[0]), -1, -1).contiguous()
    positions = cache.positions
    if step_fn is None:
        graphed = CUDAGraphStep(block, cache, ctx.add_cond, ctx.query_scale, mods,
                                tuple(token_in.shape), token_in.dtype)

        def step(tok: Tensor, i: int) -> StepParams:
            return StepParams(*graphed(tok, positions[i:i + 1]))
    else:
        def step(tok: Tensor, i: int) -> StepParams:
            return StepParams(*step_fn(block, tok, positions[i:i + 1], cache, ctx.add_cond,
                                       ctx.query_scale, mods))

    return token_loop(block, z_tokens, token_in, step, ctx)
