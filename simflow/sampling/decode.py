"""The one-position step of a flow block over the CPU key/value cache, written for latency.

On CPU a guided token step of a small flow is bound by per-call overhead more than by arithmetic:
:meth:`FlowBlock.step <simflow.flow.FlowBlock.step>` issues ~96 torch calls per token and block
of a guided two-layer block (each ~1 µs at these sizes), plus an ``nn.Module`` dispatch per
sub-module. :class:`CPUDecodeStep` computes the same thing with the block's own parameters,
gathered once per block, in ~70 calls and no module dispatch: functional layer norms and linear maps, queries scaled before the dot product (so the
copy that the strided query needs anyway carries the scale), the residuals added out of place
(no accumulator reshapes), and the position embedding and additive condition summed once per
block. The arithmetic is that of ``FlowBlock.step`` up to float rounding; equality with the
uncached reference is tested in ``tests/test_sampling.py``, the speed measured in
docs/performance.md ("Guided sampling against ml-tarflow").

Only the CPU cache layout (:class:`~simflow.sampling.cache.KVCache` with transposed keys) has this
step. On CUDA the sampler keeps ``FlowBlock.step`` with SDPA, the path the GPU check verifies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from simflow.flow import FlowBlock, StepParams
from simflow.sampling.cache import KVCache


class CPUDecodeStep:
    """Position i's affine parameters (rows, 1, D) from its transformer input ``token_in``
    (rows, 1, width) — SOS or the embedding of token i − 1, not yet position-embedded — writing
    position i's keys and values into ``cache`` at ``cache.length`` (the caller advances it).

    ``add_cond`` (rows, width) or None, ``query_scale`` (rows, 1, 1, 1) or None and
    ``modulations`` (:meth:`FlowBlock.modulations`) are those of :meth:`FlowBlock.step`."""

    def __init__(self, block: FlowBlock, cache: KVCache, add_cond: Tensor | None,
                 query_scale: Tensor | None, modulations: list[tuple[Tensor, ...]] | None):
        if not cache.transposed_keys:
            raise ValueError("CPUDecodeStep needs the CPU cache layout (KVCache with transposed keys)")
        self.block = block
        self.cache = cache
        attn = block.layers[0].attn
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.width = block.proj_in.out_features
        # position embedding + additive condition, (1 or rows, T, width), per position as views
        base = block.pos_embed if add_cond is None else block.pos_embed + add_cond[:, None]
        self.position_terms = base.split(1, dim=1)
        # SDPA's 1/√head_dim, times the per-row 1/τ of attention-temperature guidance
        self.query_scale = (attn.head_dim ** -0.5 if query_scale is None
                            else query_scale.view(-1, 1, 1) * attn.head_dim ** -0.5)
        self.layers = [(layer.norm1, layer.attn.qkv, layer.attn.proj, layer.norm2, layer.mlp.fc1,
                        layer.mlp.fc2, layer.mlp.gelu) for layer in block.layers]
        self.modulations = modulations

    def __call__(self, token_in: Tensor, position: int) -> StepParams:
        x = token_in + self.position_terms[position]
        rows = x.shape[0]
        end = self.cache.length + 1
        shape = (self.width,)
        for i, (norm1, qkv, proj, norm2, fc1, fc2, gelu) in enumerate(self.layers):
            mod = None if self.modulations is None else self.modulations[i]
            h = F.layer_norm(x, shape, norm1.weight, norm1.bias, norm1.eps)
            if mod is not None:
                h = torch.addcmul(mod[0], h, mod[1])
            q, k, v = F.linear(h, qkv.weight, qkv.bias).view(rows, 3, self.heads, self.head_dim).unbind(1)
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys.select(3, end - 1).copy_(k)
            values.select(2, end - 1).copy_(v)
            scores = torch.matmul((q * self.query_scale).unsqueeze(2), keys.narrow(3, 0, end))
            out = torch.matmul(scores.softmax(-1), values.narrow(2, 0, end))
            out = F.linear(out.view(rows, 1, self.width), proj.weight, proj.bias)
            x = x + out if mod is None else torch.addcmul(x, mod[2], out)
            h = F.layer_norm(x, shape, norm2.weight, norm2.bias, norm2.eps)
            if mod is not None:
                h = torch.addcmul(mod[3], h, mod[4])
            out = F.linear(F.gelu(F.linear(h, fc1.weight, fc1.bias), approximate=gelu),
                           fc2.weight, fc2.bias)
            x = x + out if mod is None else torch.addcmul(x, mod[5], out)
        return self.block.params(x)
