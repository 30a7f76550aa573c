"""Preallocated key/value caches of one flow block, the :class:`~simflow.flow.AttentionCache` s of
the sampler.

Shapes: ``keys``/``values`` are lists (one per layer) of ``(B, heads, T, head_dim)`` tensors —
separate tensors, not views of one stacked buffer, because ``torch.compile`` copies a whole stacked
buffer when a view of it is written in place. The buffers are allocated once per sampling call and
reused by every block (sized for the deepest), so no tensor is concatenated or reallocated in the
token loop.

* :class:`KVCache` (dynamic shapes): writes at ``length`` and attends over the positions up to the
  new end, so attention cost grows with the position. The cached and Jacobi paths.
* :class:`StaticKVCache` (static shapes): writes at a *tensor* position and attends over all ``T``
  slots under a mask of the later ones. Every token step then has the same shapes and no Python-int
  position, which is what ``torch.compile`` (no recompile per token) and CUDA-graph capture need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _buffers(layers: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
             zero: bool) -> list[Tensor]:
    alloc = torch.zeros if zero else torch.empty
    return [alloc(shape, device=device, dtype=dtype) for _ in range(layers)]


class KVCache:
    """Dynamic-shape cache: ``length`` positions are written; :meth:`attend` appends the new ones
    at ``length`` (the sampler advances ``length`` once a position is final).

    On CPU the keys are stored transposed, ``(B, heads, head_dim, T)`` per layer, and one new
    query attends by two plain matmuls, q·Kᵀ straight from that layout, then softmax·V: the same
    arithmetic as SDPA, 14–18% less CPU time per call than SDPA's CPU flash kernel over an
    untransposed cache at 128–256 cached positions (16 rows, 2 heads of 64; docs/performance.md). Elsewhere (CUDA) keys keep the
    ``(B, heads, T, head_dim)`` layout and SDPA, whose fused kernels keep the scores in fp32
    under bf16 autocast."""

    def __init__(self, layers: int, batch: int, heads: int, seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, transposed_keys: bool | None = None):
        """``transposed_keys``: the key layout; None (the sampler's choice) = on CPU only."""
        self.transposed_keys = (torch.device(device).type == "cpu" if transposed_keys is None
                                else transposed_keys)
        key_shape = (batch, heads, head_dim, seq_len) if self.transposed_keys else (batch, heads, seq_len, head_dim)
        self.keys = _buffers(layers, key_shape, device, dtype, zero=False)
        self.values = _buffers(layers, (batch, heads, seq_len, head_dim), device, dtype, zero=False)
        self.scale = head_dim ** -0.5  # SDPA's default
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` of shape (B, heads, n, head_dim) at the current position and return the
        cached keys (in the stored layout) and values up to and including them."""
        n, end = k.shape[2], self.length + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        # narrow + copy_ rather than slice assignment: the same copy with two fewer dispatches
        # (Tensor.__setitem__ builds its index in Python), and this runs per token and layer.
        if self.transposed_keys:
            keys.narrow(3, self.length, n).copy_(k.transpose(2, 3))
            keys = keys.narrow(3, 0, end)
        else:
            keys.narrow(2, self.length, n).copy_(k)
            keys = keys.narrow(2, 0, end)
        values.narrow(2, self.length, n).copy_(v)
        return keys, values.narrow(2, 0, end)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the n new positions (B, heads, n, head_dim) over the cache and themselves."""
        keys, values = self.write(layer, k, v)
        n = q.shape[2]
        # With one new position every cached position is in its past, so attention is unmasked; a
        # multi-position step (a Jacobi chunk) needs causality within the new chunk.
        if n == 1 and self.transposed_keys:
            # The scale goes on q, not on the scores: q is a strided view of the qkv output that
            # matmul would copy anyway, so the product makes the contiguous copy it needs and the
            # separate pass over the scores is gone (bit-identical for a power-of-4 head size,
            # whose scale is a power of 2; float error otherwise).
            return torch.matmul(torch.matmul(q * self.scale, keys).softmax(-1), values)
        if self.transposed_keys:
            keys = keys.transpose(2, 3)
        if n == 1:
            return F.scaled_dot_product_attention(q, keys, values)
        end = keys.shape[2]
        mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(end - n)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class StaticKVCache:
    """Static-shape cache, zero-filled: unwritten slots are masked out, but a NaN left in
    uninitialised memory would survive the 0 weight. A step at position ``p`` ((1,) long tensor)
    attends through :meth:`at`; the position tensor is the whole state (no Python counter)."""

    def __init__(self, layers: int, batch: int, heads: int, seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, heads, seq_len, head_dim)
        self.keys = _buffers(layers, shape, device, dtype, zero=True)
        self.values = _buffers(layers, shape, device, dtype, zero=True)
        self.positions = torch.arange(seq_len, device=device)

    def write_at(self, layer: int, position: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position: ``position`` is a (1,) long tensor, ``k, v`` are
        (B, heads, 1, head_dim). Returns the full (B, heads, T, head_dim) buffers of ``layer``."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, position, k.to(keys.dtype))
        values.index_copy_(2, position, v.to(values.dtype))
        return keys, values

    def mask(self, position: Tensor) -> Tensor:
        """(1, 1, 1, T) boolean attention mask: True at the slots ≤ ``position`` ((1,) long)."""
        return (self.positions <= position).view(1, 1, 1, -1)

    def at(self, position: Tensor) -> "StaticSlot":
        """The :class:`~simflow.flow.AttentionCache` of one token step at ``position``."""
        return StaticSlot(self, position)


class StaticSlot:
    """One token step's view of a :class:`StaticKVCache`: writes at ``position`` and masks the
    later slots. The mask is built once per step and shared by every layer."""

    def __init__(self, cache: StaticKVCache, position: Tensor):
        self.cache = cache
        self.position = position
        self.mask = cache.mask(position)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.cache.write_at(layer, self.position, k, v)
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                              attn_mask=self.mask)
