"""The inverse of one flow block, z tokens → x tokens: the KV-cached token loop (the default),
block-wise Jacobi, and the uncached reference the others are tested against.

Every function takes the block's z tokens (B, T, D) in raster order and returns its x tokens in
raster order, in the dtype of z. Inside, tokens are in the block's order and in fp32. Position i's
parameters come from :meth:`FlowBlock.step <simflow.flow.FlowBlock.step>`; with guidance the batch
holds both branches (2B rows, conditional first) and :class:`SamplingContext` combines them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from simflow.flow import FlowBlock, StepParams
from simflow.sampling.cache import KVCache
from simflow.sampling.decode import CPUDecodeStep
from simflow.sampling.guidance import GuidanceStrategy


@dataclass
class SamplingContext:
    """What every block's inverse shares within one sampling call.

    ``add_cond`` / ``ada_cond``: the blocks' conditions (:meth:`TransformerFlow.conditions
    <simflow.flow.TransformerFlow.conditions>`), 2B rows when ``guided``; ``query_scale``
    (2B, 1, 1, 1) or None: 1/τ on the unconditional rows (attention-temperature guidance);
    ``strategy`` and ``weight`` (w): how the two branches are combined."""

    add_cond: Tensor | None
    ada_cond: Tensor | None
    query_scale: Tensor | None
    strategy: GuidanceStrategy
    weight: float | None
    guided: bool

    def rows(self, batch: int) -> int:
        """Rows of the transformer batch for ``batch`` samples (both branches when guided)."""
        return 2 * batch if self.guided else batch

    def combine(self, p: StepParams, position: int | Tensor, num_tokens: int) -> StepParams:
        """The guided parameters (B rows) of the 2B-row ``p``; ``p`` itself without guidance."""
        if not self.guided:
            return p
        (shift_c, shift_u), (log_scale_c, log_scale_u) = p.shift.chunk(2), p.log_scale.chunk(2)
        cond, uncond = StepParams(shift_c, log_scale_c), StepParams(shift_u, log_scale_u)
        return self.strategy(cond, uncond, self.weight, position, num_tokens)

    def combine_chunk(self, p: StepParams, start: int, num_tokens: int) -> StepParams:
        """:meth:`combine` for a chunk of positions ``start…``. An annealed weight depends on the
        position: strategies that accept a tensor of positions get them all at once, others are
        applied position by position."""
        if not self.guided:
            return p
        n = p.shift.shape[1]
        if getattr(self.strategy, "accepts_position_tensor", False):
            positions = torch.arange(start, start + n, device=p.shift.device).view(1, n, 1)
            return self.combine(p, positions, num_tokens)
        parts = [self.combine(StepParams(p.shift[:, j:j + 1], p.log_scale[:, j:j + 1]), start + j,
                              num_tokens)
                 for j in range(n)]
        return StepParams(torch.cat([q.shift for q in parts], 1),
                          torch.cat([q.log_scale for q in parts], 1))

    def embed(self, block: FlowBlock, x: Tensor) -> Tensor:
        """Transformer input of the next position(s) from new tokens x (B, n, D): both branches
        share the tokens, so they are embedded once and duplicated."""
        h = block.embed(x)
        return torch.cat([h, h]) if self.guided else h


def token_loop(block: FlowBlock, z_tokens: Tensor, token_in: Tensor,
               step: Callable[[Tensor, int], StepParams], ctx: SamplingContext) -> Tensor:
    """The autoregressive inverse of one block, shared by the cached and static-shape paths.

    ``step(transformer input, i)`` gives position i's (shift, log_scale) (2B rows when guided);
    after guidance, x_i = z_i·exp(log_scale) + shift becomes the next input.
    """
    z_ord = block.order(z_tokens).float()
    t = z_ord.shape[1]
    x_ord = torch.empty_like(z_ord)
    # Per-position views made once (the loop is bound by per-op overhead on CPU); each x_i is
    # written straight into its slot of x_ord.
    z_steps, x_steps = z_ord.split(1, dim=1), x_ord.split(1, dim=1)
    for i in range(t):
        p = ctx.combine(step(token_in, i), i, t)
        x_i = torch.addcmul(p.shift, z_steps[i], p.log_scale.exp(), out=x_steps[i])
        if i + 1 < t:
            token_in = ctx.embed(block, x_i)
    return block.order(x_ord).to(z_tokens.dtype)


def invert_block_cached(block: FlowBlock, z_tokens: Tensor, cache: KVCache,
                        ctx: SamplingContext) -> Tensor:
    """Token by token over a :class:`KVCache` (one position of attention per layer and token).
    Over the CPU layout each position's parameters come from a
    :class:`~simflow.sampling.decode.CPUDecodeStep` (the same arithmetic in ~70 torch calls per
    token instead of ~96); elsewhere from :meth:`FlowBlock.step`."""
    cache.reset()
    mods = block.modulations(ctx.ada_cond)
    if cache.transposed_keys:
        params_at = CPUDecodeStep(block, cache, ctx.add_cond, ctx.query_scale, mods)
    else:
        def params_at(token_in: Tensor, i: int) -> StepParams:
            return block.step(token_in, slice(i, i + 1), cache, ctx.add_cond, ctx.ada_cond,
                              ctx.query_scale, mods)

    def step(token_in: Tensor, i: int) -> StepParams:
        p = params_at(token_in, i)
        cache.length += 1
        return p

    return token_loop(block, z_tokens, block.sos.expand(ctx.rows(z_tokens.shape[0]), -1, -1), step,
                      ctx)


def invert_block_jacobi(block: FlowBlock, z_tokens: Tensor, cache: KVCache, ctx: SamplingContext,
                        chunk: int, tol: float, max_iter: int) -> tuple[Tensor, list[int]]:
    """Block-wise Jacobi inverse (STARFlow): each chunk of ``chunk`` positions is a fixed point
    x = f(x) of the affine inverse given its own (guessed) earlier tokens; iterate from the guess
    x = z until no element changes by more than ``tol``, or ``min(max_iter, chunk size)`` passes (a
    chunk of n tokens is exact after n). Returns the x tokens and the passes of each chunk."""
    z_ord = block.order(z_tokens).float()
    b, t, _ = z_ord.shape
    x_ord = torch.empty_like(z_ord)
    mods = block.modulations(ctx.ada_cond)
    first_in = block.sos.expand(ctx.rows(b), -1, -1)  # transformer input of the chunk's first position
    iterations = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        z_c = z_ord[:, start:end]
        x_c = z_c
        n_iter = min(max_iter, end - start)
        for it in range(n_iter):
            inputs = first_in if end - start == 1 else torch.cat(
                [first_in, ctx.embed(block, x_c[:, :-1])], dim=1)
            cache.length = start  # every pass rewrites the chunk's keys/values
            p = ctx.combine_chunk(block.step(inputs, slice(start, end), cache, ctx.add_cond,
                                             ctx.ada_cond, ctx.query_scale, mods), start, t)
            x_new = z_c * torch.exp(p.log_scale) + p.shift
            # Token 0 of the chunk is exact after one pass, token j after j + 1 passes.
            done = it + 1 == n_iter or bool((x_new - x_c).abs().max() <= tol)
            x_c = x_new
            if done:
                break
        iterations.append(it + 1)
        cache.length = end
        x_ord[:, start:end] = x_c
        first_in = ctx.embed(block, x_c[:, -1:])
    return block.order(x_ord).to(z_tokens.dtype), iterations


def invert_block_uncached(block: FlowBlock, z_tokens: Tensor, ctx: SamplingContext) -> Tensor:
    """The plain reference: a full causal pass over all T positions for every token (slow)."""
    z_ord = block.order(z_tokens).float()
    t = z_ord.shape[1]
    x_ord = torch.zeros_like(z_ord)
    for i in range(t):
        x_in = torch.cat([x_ord, x_ord]) if ctx.guided else x_ord
        h, _ = block.run_layers(block.inputs(x_in, ctx.add_cond), ctx.ada_cond,
                                query_scale=ctx.query_scale)
        p = ctx.combine(block.params(h[:, i:i + 1]), i, t)
        x_ord[:, i:i + 1] = z_ord[:, i:i + 1] * torch.exp(p.log_scale) + p.shift
    return block.order(x_ord).to(z_tokens.dtype)
