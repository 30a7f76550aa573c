"""Transformer autoregressive normalizing flow (TarFlow / STARFlow style) on image or latent maps.

The flow maps data ``x`` of shape ``(B, C, H, W)`` to Gaussian noise ``z`` of the same shape. The
map is a stack of *flow blocks*. Each block sees ``T = (H/p)·(W/p)`` tokens of size ``D = C·p²``
(``p`` = patch size) in its own order, and applies an affine autoregressive transform:

    z_i = (x_i − μ_i(x_<i)) / σ_i(x_<i),        log|det ∂z/∂x| = −Σ_i Σ_d log σ_i,d

where ``(μ_i, σ_i)`` come from a causal transformer whose input at position ``i`` is a learned
start-of-sequence token (i = 0) or the embedding of ``x_{i−1}``. Every token, the first included,
is transformed (STARFlow's SOS; TarFlow left token 0 untouched). Token order alternates between
blocks (raster order, then reversed), so every token eventually depends on every other.

Conventions used throughout (and by every caller of this module):

* ``logdet`` is log|det ∂z/∂x| **summed over all dimensions of a sample**, in nats, shape ``(B,)``.
* ``nll`` is −log p(x) per sample in nats (a sum, not a mean), including the Gaussian constant.
* ``layers_per_block[k]`` is the depth of the k-th block in the data → noise direction. STARFlow's
  deep-shallow layout ``[2, 2, 2, 2, 2, 46]`` puts the deep block last, i.e. next to the noise, so
  it runs *first* when sampling.
* The affine parameters are computed in fp32 whatever the autocast dtype. The default scale
  parametrisation is ``softplus`` with a tanh soft-clip of 4 (STARFlow's fix for exp overflow);
  ``exp`` (TarFlow's ``z = (x − μ)·exp(−a)``) is available. Both are reported as ``log σ``.
* Class conditioning: a dropped label (``y = −1``) or an unconditional call uses the *mean* of the
  class embeddings (TarFlow), so no extra "null class" parameter is learned. With ``conditioning =
  "adaln"`` the class embedding modulates every layer (DiT-style AdaLN, zero-initialised); with
  ``"add"`` it is added to every token (TarFlow).

Sampling inverts the blocks in reverse order, token by token, with a preallocated key/value cache
(:class:`KVCache`). Guidance runs the conditional and the "unconditional" branch in **one batched
pass** of size 2B and combines their per-token parameters with a pluggable
:class:`GuidanceStrategy`. The unconditional branch is the null class for conditional models, or the
same input under an attention temperature τ (TarFlow's guidance for unconditional models).

Speed options of :meth:`TransformerFlow.reverse` (static-shape step, ``torch.compile``, CUDA graphs,
block-wise Jacobi) and :meth:`TransformerFlow.compile_blocks` for training are measured by
``simflow bench`` and documented, with their tolerances, in docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)
SOFTPLUS_INV_ONE = math.log(math.e - 1)  # softplus(SOFTPLUS_INV_ONE) = 1, so σ = 1 at init


# --------------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------------
def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) → (B, T, C·p²) tokens in raster order of the patch grid."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, channels: int, height: int, width: int, patch_size: int) -> Tensor:
    """(B, T, C·p²) tokens in raster order → (B, C, H, W); the inverse of :func:`patchify`."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, height // p, width // p, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


# --------------------------------------------------------------------------------------------
# Key/value cache for sampling
# --------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values of every layer of one flow block, written in place.

    Shapes: ``keys``/``values`` are lists (one per layer) of ``(B, heads, T, head_dim)`` tensors —
    separate tensors, not views of one stacked buffer, because ``torch.compile`` copies a whole
    stacked buffer when a view of it is written in place. ``length`` is the number of positions
    already written; attention at a new position reads the views ``[..., :length]``. The buffers
    are allocated once per sampling call and reused by every block (sized for the deepest), so no
    tensor is concatenated or reallocated in the token loop.

    Two ways to use it:

    * :meth:`write` (dynamic shapes): appends at ``length`` and returns the views up to the new
      end, so attention cost grows with the position. The default sampling path.
    * :meth:`write_at` + :meth:`mask` (static shapes): writes at a *tensor* position and returns
      the full ``T``-long buffers; attention masks the positions after it. Every token step then has
      the same shapes and no Python-int position, which is what ``torch.compile`` (no recompile per
      token) and CUDA-graph capture need. Such a cache is zero-filled (``zero=True``): unwritten
      slots are masked out, but a NaN left in uninitialised memory would survive the 0 weight.
    """

    def __init__(self, layers: int, batch: int, heads: int, seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, zero: bool = False):
        shape = (batch, heads, seq_len, head_dim)
        alloc = torch.zeros if zero else torch.empty
        self.keys = [alloc(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [alloc(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.positions = torch.arange(seq_len, device=device)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` of shape (B, heads, n, head_dim) at the current position and return the
        cached keys and values up to and including them."""
        n = k.shape[2]
        end = self.length + n
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(self, layer: int, position: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Static-shape write of one position: ``position`` is a (1,) long tensor, ``k, v`` are
        (B, heads, 1, head_dim). Returns the full (B, heads, T, head_dim) buffers of ``layer``;
        combine with :meth:`mask`. ``length`` is not touched (the position tensor is the state)."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, position, k.to(keys.dtype))
        values.index_copy_(2, position, v.to(values.dtype))
        return keys, values

    def mask(self, position: Tensor) -> Tensor:
        """(1, 1, 1, T) boolean attention mask: True at the slots ≤ ``position`` ((1,) long)."""
        return (self.positions <= position).view(1, 1, 1, -1)


# --------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------
def linear_residual(linear: nn.Linear, a: Tensor, residual: Tensor | None) -> Tensor:
    """``residual + linear(a)`` (just ``linear(a)`` for ``residual=None``), with the residual as
    the matmul's accumulator: ``residual + bias`` is formed once and ``a·Wᵀ`` is added into it in
    place. ``linear(a) + residual`` costs one more pass over the (B, T, width) activations (the
    matmul first copies the bias into its output) and one more temporary. Under autocast (or with
    mixed dtypes) it is plain ``residual + linear(a)``, so the residual stream keeps its dtype."""
    if residual is None:
        return linear(a)
    if torch.is_autocast_enabled(a.device.type) or not a.dtype == residual.dtype == linear.weight.dtype:
        return residual + linear(a)
    out = torch.add(residual.reshape(-1, residual.shape[-1]), linear.bias)
    return out.addmm_(a.reshape(-1, a.shape[-1]), linear.weight.t()).view(residual.shape)


class Attention(nn.Module):
    """Causal multi-head self-attention over (B, T, width) through SDPA.

    In training the whole sequence is processed with ``is_causal=True`` (no explicit mask, so the
    flash / memory-efficient kernels apply). In sampling one new position is processed against the
    :class:`KVCache`, which only holds earlier positions, so no mask is needed either.
    ``query_scale`` (B, 1, 1, 1) multiplies the queries per sample: ``1/τ`` implements an attention
    temperature τ for a part of the batch (guidance for unconditional models).
    """

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width {width} is not divisible by head_dim {head_dim}")
        self.heads = width // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                query_scale: Tensor | None = None,
                slot: tuple[Tensor, Tensor] | None = None, residual: Tensor | None = None) -> Tensor:
        """Attention output (B, t, width); ``residual + output`` when ``residual`` is given."""
        b, t, _ = x.shape
        # q, k, v as (B, heads, t, head_dim) views of the qkv output, split on its "3" axis: the
        # backward then stacks their gradients straight into the (B, t, 3, heads, head_dim)
        # layout of the qkv output (a permute-first split costs one more full copy per layer).
        q, k, v = (part.transpose(1, 2)
                   for part in self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2))
        if query_scale is not None:
            q = q * query_scale.to(q.dtype)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif slot is not None:  # static shapes: (position, mask); later slots masked out
            k, v = cache.write_at(layer, slot[0], k, v)
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=slot[1])
        else:
            k, v = cache.write(layer, k, v)
            # With one new position every cached position is in its past, so attention is
            # unmasked; a multi-position step (Jacobi) needs causality within the new chunk.
            causal_chunk = t > 1
            if causal_chunk:
                offset = k.shape[2] - t
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v)
        return linear_residual(self.proj, out.transpose(1, 2).reshape(b, t, -1), residual)


class MLP(nn.Module):
    """Position-wise GELU MLP, expansion 4.

    ``gelu`` is the GELU of ``F.gelu``: ``"none"`` (the exact, erf-based GELU, as TarFlow) or
    ``"tanh"`` (its tanh approximation). On CPU the exact one is the faster of the two (forward
    and backward about 2× faster in PyTorch 2.x's kernels; see docs/performance.md)."""

    def __init__(self, width: int, expansion: int = 4, gelu: str = "none"):
        super().__init__()
        if gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' (exact) or 'tanh', got {gelu!r}")
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.gelu = gelu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """MLP output of x (B, t, width); ``residual + output`` when ``residual`` is given."""
        return linear_residual(self.fc2, F.gelu(self.fc1(x), approximate=self.gelu), residual)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer, optionally with AdaLN modulation by a condition vector.

    x: (B, T, width); cond: (B, width) or None. With ``adaln=True`` the condition produces shift,
    scale and gate for both sub-layers through a zero-initialised linear map, so the layer starts
    as a plain pre-norm layer with gates 0 (the residual branch starts switched off).
    """

    def __init__(self, width: int, head_dim: int, adaln: bool, gelu: str = "none"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.attn = Attention(width, head_dim)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.mlp = MLP(width, gelu=gelu)
        self.modulation = None
        if adaln:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def modulation_of(self, cond: Tensor) -> tuple[Tensor, ...]:
        """AdaLN terms of condition (B, width): (shift1, 1 + scale1, gate1, shift2, 1 + scale2,
        gate2), each (B, 1, width).

        The condition is constant over the tokens of a sample, so the sampler computes these once
        per block instead of once per token (per token they would cost half as much as the layer)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        return shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2

    def forward(self, x: Tensor, cond: Tensor | None, cache: KVCache | None = None, layer: int = 0,
                query_scale: Tensor | None = None, slot: tuple[Tensor, Tensor] | None = None,
                modulation: tuple[Tensor, ...] | None = None) -> Tensor:
        """``slot`` = (position, mask) selects the static-shape cache path; ``modulation`` (from
        :meth:`modulation_of`) replaces computing the AdaLN terms from ``cond``."""
        if self.modulation is None:  # the residual adds are fused into the output matmuls
            x = self.attn(self.norm1(x), cache, layer, query_scale, slot, residual=x)
            return self.mlp(self.norm2(x), residual=x)
        if modulation is None:
            modulation = self.modulation_of(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        # addcmul: one pass (and one temporary) per modulation instead of a product and a sum
        h = torch.addcmul(shift1, self.norm1(x), scale1)
        x = torch.addcmul(x, gate1, self.attn(h, cache, layer, query_scale, slot))
        h = torch.addcmul(shift2, self.norm2(x), scale2)
        return torch.addcmul(x, gate2, self.mlp(h))


# --------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------
@dataclass
class StepParams:
    """Affine parameters of one token step: x = z·exp(log_scale) + shift; tensors (B, n, D), fp32."""

    shift: Tensor
    log_scale: Tensor


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
        if self.guide in ("shift", "both"):
            shift = shift + w * (cond.shift - uncond.shift)
        if self.guide in ("scale", "both"):
            log_scale = log_scale + w * (cond.log_scale - uncond.log_scale)
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
    if name not in GUIDANCE_STRATEGIES:
        raise ValueError(f"unknown guidance method {name!r}; known: {sorted(GUIDANCE_STRATEGIES)}")
    return GUIDANCE_STRATEGIES[name](**options)


# --------------------------------------------------------------------------------------------
# One flow block
# --------------------------------------------------------------------------------------------
class FlowBlock(nn.Module):
    """One autoregressive affine flow step over T tokens of size D, in a fixed token order.

    forward: x tokens (B, T, D) in raster order → z tokens (B, T, D) in raster order, logdet (B,)
    in nats. ``flip=True`` processes the tokens in reversed raster order. The output projection is
    zero-initialised, so a fresh block is the identity map (μ = 0, σ = 1).
    """

    def __init__(self, token_dim: int, num_tokens: int, width: int, depth: int, head_dim: int,
                 flip: bool, adaln: bool, scale_param: str, soft_clip: float, gelu: str = "none"):
        super().__init__()
        self.flip = flip
        self.scale_param = scale_param
        self.soft_clip = soft_clip
        self.proj_in = nn.Linear(token_dim, width)
        self.sos = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim, adaln, gelu) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def order(self, tokens: Tensor) -> Tensor:
        """Raster order → this block's order (its own inverse)."""
        return tokens.flip(1) if self.flip else tokens

    def params(self, hidden: Tensor) -> StepParams:
        """Final hidden states (B, n, width) → fp32 affine parameters (B, n, D)."""
        out = self.proj_out(self.norm_out(hidden))
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # fp32 (or fp64), never bf16
        shift, raw = out.chunk(2, dim=-1)
        if self.soft_clip > 0:
            raw = self.soft_clip * torch.tanh(raw / self.soft_clip)
        if self.scale_param == "exp":
            log_scale = raw
        else:  # softplus: σ = softplus(raw + softplus⁻¹(1)), σ = 1 at init
            log_scale = torch.log(F.softplus(raw + SOFTPLUS_INV_ONE))
        return StepParams(shift, log_scale)

    def inputs(self, x_ordered: Tensor, add_cond: Tensor | None) -> Tensor:
        """Transformer input (B, T, width): position i holds SOS (i = 0) or embed(x_{i−1}) =
        proj_in(x_{i−1}), plus the position embedding and the additive condition.

        Computed in as few passes over (B, T, width) as possible (the training step's input): the
        additive terms are summed first at (1 or B, T, width) (SOS at position 0, proj_in's bias at
        the others), then one batched matmul adds x_{i−1}·Wᵀ into them, with a zero token at
        position 0, which therefore holds exactly sos + pos_0 (+ cond), as in the sampler. The
        embedding is computed in the parameters' dtype (fp32) also under autocast: the residual
        stream starts in fp32, as the layers' residual adds keep it."""
        b, _, d = x_ordered.shape
        with torch.autocast(x_ordered.device.type, enabled=False):
            base = torch.cat([self.pos_embed[:, :1] + self.sos,
                              self.pos_embed[:, 1:] + self.proj_in.bias], dim=1)
            if add_cond is not None:
                base = base + add_cond[:, None].to(base.dtype)
            previous = F.pad(x_ordered[:, :-1], (0, 0, 1, 0))  # x_{i−1} at position i, 0 at 0
            weight = self.proj_in.weight.t().expand(b, d, -1)
            return torch.baddbmm(base, previous.to(weight.dtype), weight)

    def run_layers(self, h: Tensor, ada_cond: Tensor | None, hidden_at: int | None = None,
                   query_scale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        hidden = None
        for i, layer in enumerate(self.layers):
            h = layer(h, ada_cond, query_scale=query_scale)
            if i == hidden_at:
                hidden = h
        return h, hidden

    def forward(self, x: Tensor, add_cond: Tensor | None = None, ada_cond: Tensor | None = None,
                hidden_at: int | None = None, query_scale: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        x_ord = self.order(x)
        h, hidden = self.run_layers(self.inputs(x_ord, add_cond), ada_cond, hidden_at, query_scale)
        p = self.params(h)
        z = (x_ord.to(p.shift.dtype) - p.shift) * torch.exp(-p.log_scale)
        logdet = -p.log_scale.sum(dim=(1, 2))
        if hidden is not None:
            hidden = self.order(hidden)  # back to raster order, so callers see the image grid
        return self.order(z).to(x.dtype), logdet, hidden

    def modulations(self, ada_cond: Tensor | None) -> list[tuple[Tensor, ...]] | None:
        """Per-layer AdaLN terms of a fixed condition (see :meth:`TransformerLayer.modulation_of`),
        or None without AdaLN."""
        if ada_cond is None or self.layers[0].modulation is None:
            return None
        return [layer.modulation_of(ada_cond) for layer in self.layers]

    def step(self, token_in: Tensor, position: int, cache: KVCache, add_cond: Tensor | None,
             ada_cond: Tensor | None, query_scale: Tensor | None,
             modulations: list[tuple[Tensor, ...]] | None = None) -> StepParams:
        """Parameters of ``position`` given the transformer input of that position (B, 1, width)
        (not yet position-embedded) and the cache holding all earlier positions. ``modulations``
        (from :meth:`modulations`) replaces recomputing the AdaLN terms of ``ada_cond``."""
        h = token_in + self.pos_embed[:, position:position + 1]
        if add_cond is not None:
            h = h + add_cond[:, None]
        for i, layer in enumerate(self.layers):
            h = layer(h, ada_cond, cache=cache, layer=i, query_scale=query_scale,
                      modulation=None if modulations is None else modulations[i])
        cache.length += 1
        return self.params(h)

    def step_static(self, token_in: Tensor, position: Tensor, cache: KVCache,
                    add_cond: Tensor | None, query_scale: Tensor | None,
                    modulations: list[tuple[Tensor, ...]] | None) -> tuple[Tensor, Tensor]:
        """Static-shape version of :meth:`step`: ``position`` is a (1,) long tensor, the cache
        (``zero=True``) is read in full under a length mask and ``cache.length`` is not used, so
        every call has identical shapes. Returns (shift, log_scale), each (B, 1, D) in fp32.
        AdaLN needs ``modulations`` (the condition is not an argument)."""
        h = token_in + self.pos_embed.index_select(1, position)
        if add_cond is not None:
            h = h + add_cond[:, None]
        slot = (position, cache.mask(position))
        for i, layer in enumerate(self.layers):
            h = layer(h, None, cache=cache, layer=i, query_scale=query_scale, slot=slot,
                      modulation=None if modulations is None else modulations[i])
        p = self.params(h)
        return p.shift, p.log_scale

    def chunk_params(self, inputs: Tensor, start: int, cache: KVCache, add_cond: Tensor | None,
                     query_scale: Tensor | None, modulations: list[tuple[Tensor, ...]] | None) -> StepParams:
        """Parameters of positions ``start … start+n−1`` from their transformer inputs (B, n, width)
        (not yet position-embedded), attending causally within the chunk and to the cached
        positions < ``start`` (block-wise Jacobi). The chunk's keys/values are written at ``start``
        and ``cache.length`` is left at ``start``, so the next iterate overwrites them."""
        n = inputs.shape[1]
        h = inputs + self.pos_embed[:, start:start + n]
        if add_cond is not None:
            h = h + add_cond[:, None]
        cache.length = start
        for i, layer in enumerate(self.layers):
            h = layer(h, None, cache=cache, layer=i, query_scale=query_scale,
                      modulation=None if modulations is None else modulations[i])
        return self.params(h)


def _static_step(block: FlowBlock, token_in: Tensor, position: Tensor, cache: KVCache,
                 add_cond: Tensor | None, query_scale: Tensor | None,
                 modulations: list[tuple[Tensor, ...]] | None) -> tuple[Tensor, Tensor]:
    """Free-function form of :meth:`FlowBlock.step_static`, the unit that is compiled or captured
    (one compiled artefact serves every block of the same depth)."""
    return block.step_static(token_in, position, cache, add_cond, query_scale, modulations)


_COMPILED_STEPS: dict[str, Callable] = {}


def compiled_static_step(mode: str = "default") -> Callable:
    """``torch.compile`` of :func:`_static_step` with static shapes, built once per mode and
    process (``"reduce-overhead"`` adds CUDA graphs on GPU)."""
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(_static_step, mode=None if mode == "default" else mode,
                                              dynamic=False)
    return _COMPILED_STEPS[mode]


class CUDAGraphStep:
    """One flow block's static-shape token step captured once as a CUDA graph and replayed per
    token. Inputs are copied into static buffers (``token_in`` (B, 1, width), ``position`` (1,));
    the returned (shift, log_scale) are the graph's static outputs, overwritten by the next replay.
    Capture happens under the caller's autocast settings (with the autocast weight cache off, as
    graph capture requires)."""

    def __init__(self, block: FlowBlock, cache: KVCache, add_cond: Tensor | None,
                 query_scale: Tensor | None, modulations: list[tuple[Tensor, ...]] | None,
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
                return _static_step(block, self.token_in, self.position, cache, add_cond,
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


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------
@dataclass
class FlowOutput:
    """Everything one forward pass produces. z: (B, C, H, W); logdet: (B,) nats; hidden: (B, T,
    width) in raster order or None; block_sq_norms: list of per-block mean z² (health check)."""

    z: Tensor
    logdet: Tensor
    hidden: Tensor | None
    block_sq_norms: list[Tensor]


class TransformerFlow(nn.Module):
    """A stack of :class:`FlowBlock` s over (B, C, H, W) maps; see the module docstring.

    Args:
        in_channels, img_size: C and H = W of the modelled maps (latents or pixels).
        patch_size: p; tokens are p×p patches, T = (img_size/p)², token size C·p².
        channels: transformer width.
        layers_per_block: depth of each block in the data → noise direction.
        num_classes: 0 for an unconditional model.
        head_dim: attention head size (64 in TarFlow/STARFlow; smaller for toy models).
        conditioning: ``"adaln"`` or ``"add"`` (see module docstring).
        label_drop: probability of replacing a label with the null (mean) embedding in training,
            so the same model also learns the unconditional density used by CFG.
        scale_param: ``"softplus"`` (default) or ``"exp"``; soft_clip: tanh bound on the raw scale
            output (0 disables).
        gelu: the MLPs' GELU, ``"none"`` (exact, the default, as TarFlow) or ``"tanh"`` (the tanh
            approximation, this module's activation before the CPU speed work; 2× slower on CPU).
    """

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int,
                 layers_per_block: Sequence[int], num_classes: int = 0, head_dim: int = 64,
                 conditioning: str = "adaln", label_drop: float = 0.1,
                 scale_param: str = "softplus", soft_clip: float = 4.0, gelu: str = "none"):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if conditioning not in ("adaln", "add"):
            raise ValueError(f"conditioning must be 'adaln' or 'add', got {conditioning!r}")
        if scale_param not in ("softplus", "exp"):
            raise ValueError(f"scale_param must be 'softplus' or 'exp', got {scale_param!r}")
        if not layers_per_block or min(layers_per_block) < 1:
            raise ValueError(f"layers_per_block needs ≥ 1 block of ≥ 1 layer, got {layers_per_block}")
        self.in_channels = in_channels
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.label_drop = label_drop
        self.layers_per_block = list(layers_per_block)
        self.num_tokens = (img_size // patch_size) ** 2
        self.token_dim = in_channels * patch_size ** 2
        self.head_dim = head_dim
        self.width = channels
        self.conditioning = conditioning if num_classes > 0 else None
        adaln = self.conditioning == "adaln"
        self.blocks = nn.ModuleList(
            FlowBlock(self.token_dim, self.num_tokens, channels, depth, head_dim, flip=k % 2 == 1,
                      adaln=adaln, scale_param=scale_param, soft_clip=soft_clip, gelu=gelu)
            for k, depth in enumerate(self.layers_per_block))
        self.class_embed = nn.Embedding(num_classes, channels) if num_classes > 0 else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.img_size ** 2

    # ---- conditioning -----------------------------------------------------------------------
    def class_embedding(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """(B, width) embedding of labels y; y = −1 (dropped) or y = None → the mean embedding."""
        if self.class_embed is None:
            return None
        null = self.class_embed.weight.mean(0, keepdim=True)
        if y is None:
            return null.expand(batch, -1)
        y = y.to(device)
        dropped = y < 0
        emb = self.class_embed(y.clamp(min=0))
        return torch.where(dropped[:, None], null.expand_as(emb), emb)

    def drop_labels(self, y: Tensor) -> Tensor:
        """Replace labels by −1 with probability ``label_drop`` (training-time CFG dropout)."""
        drop = torch.rand(y.shape, device=y.device) < self.label_drop
        return torch.where(drop, torch.full_like(y, -1), y)

    def _conds(self, emb: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if emb is None:
            return None, None
        return (emb, None) if self.conditioning == "add" else (None, emb)

    # ---- density ------------------------------------------------------------------------------
    def encode(self, x: Tensor, y: Tensor | None = None, hidden_layer: int | None = None,
               query_scale: Tensor | None = None) -> FlowOutput:
        """Full forward pass. ``hidden_layer`` (global layer index counted from the data side)
        selects a transformer hidden state to return, e.g. for REPA alignment."""
        if y is not None and self.class_embed is not None and self.training and self.label_drop > 0:
            y = self.drop_labels(y)
        add_cond, ada_cond = self._conds(self.class_embedding(y, x.shape[0], x.device))
        tokens = patchify(x, self.patch_size)
        logdet = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        hidden, sq_norms, first = None, [], 0
        for block in self.blocks:
            local = None
            if hidden_layer is not None and first <= hidden_layer < first + len(block.layers):
                local = hidden_layer - first
            tokens, block_logdet, h = block(tokens, add_cond, ada_cond, local, query_scale)
            logdet = logdet + block_logdet
            hidden = h if h is not None else hidden
            sq_norms.append(tokens.detach().float().pow(2).mean())
            first += len(block.layers)
        z = unpatchify(tokens, self.in_channels, self.img_size, self.img_size, self.patch_size)
        return FlowOutput(z, logdet, hidden, sq_norms)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) → (z of x's shape, logdet (B,) = log|det ∂z/∂x| in nats)."""
        out = self.encode(x, y)
        return out.z, out.logdet

    def nll_from(self, z: Tensor, logdet: Tensor) -> Tensor:
        """Per-sample −log p(x) in nats from a forward pass: ½‖z‖² + (D/2)·log 2π − logdet."""
        return 0.5 * z.float().pow(2).flatten(1).sum(1) + 0.5 * self.num_dims * LOG_2PI - logdet

    def nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-sample negative log-likelihood −log p(x), in nats, shape (B,)."""
        z, logdet = self(x, y)
        return self.nll_from(z, logdet)

    def score(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """∇ₓ log p(x) per sample, (B, C, H, W), computed in fp32 (no label dropout)."""
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                x = x.detach().float().requires_grad_(True)
                with torch.autocast(x.device.type, enabled=False):
                    log_p = -self.nll(x, y).sum()  # samples are independent: d(Σ log p)/dx_b = score_b
                (grad,) = torch.autograd.grad(log_p, x)
        finally:
            self.train(was_training)
        return grad

    def denoise(self, x: Tensor, noise_std: float, y: Tensor | None = None,
                step_scale: float = 1.0) -> Tensor:
        """Tweedie / score-based denoising: x + step_scale·σ²·∇ₓ log p(x).

        For a model of y = x + N(0, σ²) noise, ``step_scale = 1`` is the theoretical optimum
        (E[x | y] under the model's density of y).
        """
        return (x.float() + step_scale * noise_std ** 2 * self.score(x, y)).to(x.dtype)

    # ---- speed options --------------------------------------------------------------------
    def compile_blocks(self, **compile_options) -> "TransformerFlow":
        """``torch.compile`` every block's forward in place (the training / density path; options go
        to :func:`torch.compile`, e.g. ``mode="max-autotune"``). Parameter names and the state dict
        are unchanged. Blocks of equal depth share one compiled graph. Compile after making any
        ``copy.deepcopy`` of the model (e.g. an EMA), which a compiled module may not survive.
        Sampling is unaffected: it uses :meth:`FlowBlock.step`, see ``reverse(compile_step=...)``."""
        for block in self.blocks:
            block.compile(**compile_options)
        return self

    # ---- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def reverse(self, z: Tensor, y: Tensor | None = None, guidance: float | None = None,
                guidance_method: str | GuidanceStrategy = "linear", attn_temp: float | None = None,
                use_cache: bool = True, *, static_shapes: bool = False,
                compile_step: bool | str = False, cuda_graph: bool = False,
                jacobi_block_size: int | None = None, jacobi_tol: float = 1e-3,
                jacobi_max_iter: int = 32, stats: dict | None = None,
                **guidance_options) -> Tensor:
        """Invert the flow: noise z (B, C, H, W) → x, autoregressively token by token.

        Guidance (``guidance`` = w; ``None`` samples without it, any number, 0 included, runs the
        guided pass): the conditional branch (label ``y``) is contrasted with the null class, run
        under attention temperature ``attn_temp`` when given (unconditional models need it). Both branches run batched
        (2B). ``guidance_method`` names a strategy in :data:`GUIDANCE_STRATEGIES` (options such as
        ``annealed=True`` or ``guide="shift"`` go to its constructor) or is a strategy object.
        ``use_cache=False`` recomputes every step with a full causal pass (slow; the reference
        implementation the cached path is tested against).

        Speed options (keyword only; each is tested against the default path, see
        docs/performance.md for tolerances and measurements):

        * ``static_shapes``: every token step has the same shapes (full-length cache under a
          length mask, tensor position), so it can be compiled or graph-captured.
        * ``compile_step``: ``torch.compile`` the static step (True → default mode, or a mode name
          such as ``"reduce-overhead"``); implies ``static_shapes``.
        * ``cuda_graph``: capture the static step of each block as a CUDA graph and replay it per
          token (CUDA only); implies ``static_shapes``.
        * ``jacobi_block_size``: block-wise Jacobi sampling (STARFlow): chunks of this many tokens
          are solved by parallel fixed-point iteration, stopping when no element of the chunk
          changes by more than ``jacobi_tol`` or after ``min(jacobi_max_iter, chunk)`` iterations
          (a chunk of n tokens is exact after n iterations). Approximate for ``jacobi_tol > 0``;
          one host sync per iteration (the stopping test).
        * ``stats``: a dict to receive sampler statistics (Jacobi: iterations per chunk).
        """
        strategy = (build_guidance(guidance_method, **guidance_options)
                    if isinstance(guidance_method, str) else guidance_method)
        static = static_shapes or bool(compile_step) or cuda_graph
        if not use_cache and (static or jacobi_block_size is not None):
            raise ValueError("use_cache=False is the plain reference path; it cannot be combined "
                             "with static_shapes/compile_step/cuda_graph/jacobi_block_size")
        if jacobi_block_size is not None:
            if static:
                raise ValueError("jacobi_block_size cannot be combined with static_shapes/"
                                 "compile_step/cuda_graph (Jacobi chunks have their own shapes)")
            if int(jacobi_block_size) < 1 or jacobi_max_iter < 1 or jacobi_tol < 0:
                raise ValueError(f"Jacobi sampling needs jacobi_block_size ≥ 1, jacobi_max_iter ≥ 1 "
                                 f"and jacobi_tol ≥ 0; got {jacobi_block_size}, {jacobi_max_iter}, "
                                 f"{jacobi_tol}")
        if cuda_graph and compile_step:
            raise ValueError("choose one of cuda_graph=True (manual capture) and compile_step "
                             "(torch.compile; mode 'reduce-overhead' also uses CUDA graphs)")
        if cuda_graph and z.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors; z is on {z.device} "
                             "(use static_shapes or compile_step on CPU)")
        b = z.shape[0]
        guided = guidance is not None
        if guided and self.class_embed is None and attn_temp is None:
            raise ValueError("guidance on an unconditional model needs attn_temp (attention-"
                             "temperature guidance); pass e.g. attn_temp=1.5")
        emb = self.class_embedding(y, b, z.device)
        query_scale = None
        if guided:
            # The unconditional branch is the null class (TarFlow), under attention temperature τ
            # when one is given (the only contrast an unconditional model has).
            uncond_emb = self.class_embedding(None, b, z.device)
            if attn_temp is not None:
                query_scale = torch.ones(2 * b, 1, 1, 1, device=z.device)
                query_scale[b:] = 1.0 / attn_temp
            emb = None if emb is None else torch.cat([emb, uncond_emb])
        add_cond, ada_cond = self._conds(emb)

        tokens = patchify(z, self.patch_size)
        batch = 2 * b if guided else b
        param_dtype = next(self.parameters()).dtype
        cache_dtype = (torch.get_autocast_dtype(z.device.type)
                       if torch.is_autocast_enabled(z.device.type) else param_dtype)
        cache = None
        if use_cache:  # the plain path needs none
            cache = KVCache(max(self.layers_per_block), batch, self.width // self.head_dim,
                            self.num_tokens, self.head_dim, z.device, cache_dtype, zero=static)
        step_fn: Callable | None = None
        if compile_step:
            mode = compile_step if isinstance(compile_step, str) else "default"
            step_fn = compiled_static_step(mode)
            if "cudagraphs" in mode or mode == "reduce-overhead":
                # CUDA-graph trees only replay when mutated inputs keep a fixed address.
                for buffer in cache.keys + cache.values:
                    torch._dynamo.mark_static_address(buffer)
        elif static and not cuda_graph:
            step_fn = _static_step
        if stats is not None and jacobi_block_size is not None:
            stats["jacobi_iterations"] = []
        for block in reversed(self.blocks):
            common = (add_cond, ada_cond, query_scale, strategy, guidance, guided)
            if not use_cache:
                tokens = self._reverse_block_uncached(block, tokens, *common)
            elif jacobi_block_size is not None:
                tokens, iters = self._reverse_block_jacobi(
                    block, tokens, cache, *common, int(jacobi_block_size), jacobi_tol, jacobi_max_iter)
                if stats is not None:
                    stats["jacobi_iterations"].append(iters)
            elif static:
                tokens = self._reverse_block_static(block, tokens, cache, *common, step_fn=step_fn)
            else:
                tokens = self._reverse_block_cached(block, tokens, cache, *common)
        return unpatchify(tokens, self.in_channels, self.img_size, self.img_size, self.patch_size)

    @staticmethod
    def _combine(p: StepParams, strategy: GuidanceStrategy, weight: float, position: int,
                 num_tokens: int, guided: bool) -> StepParams:
        if not guided:
            return p
        b = p.shift.shape[0] // 2
        cond = StepParams(p.shift[:b], p.log_scale[:b])
        uncond = StepParams(p.shift[b:], p.log_scale[b:])
        return strategy(cond, uncond, weight, position, num_tokens)

    @classmethod
    def _combine_chunk(cls, p: StepParams, strategy: GuidanceStrategy, weight: float, start: int,
                       num_tokens: int, guided: bool) -> StepParams:
        """:meth:`_combine` for a chunk of positions ``start…``. An annealed weight depends on the
        position: strategies that accept a tensor of positions get them all at once, others are
        applied position by position."""
        if not guided:
            return p
        n = p.shift.shape[1]
        if getattr(strategy, "accepts_position_tensor", False):
            positions = torch.arange(start, start + n, device=p.shift.device).view(1, n, 1)
            return cls._combine(p, strategy, weight, positions, num_tokens, guided)
        parts = [cls._combine(StepParams(p.shift[:, j:j + 1], p.log_scale[:, j:j + 1]), strategy,
                              weight, start + j, num_tokens, guided)
                 for j in range(p.shift.shape[1])]
        return StepParams(torch.cat([q.shift for q in parts], 1),
                          torch.cat([q.log_scale for q in parts], 1))

    @staticmethod
    def _embed_token(block: FlowBlock, x_i: Tensor, guided: bool) -> Tensor:
        """Transformer input of the next position from the new token x_i (B, n, D): both CFG
        branches share the token, so it is embedded once and duplicated."""
        h = block.proj_in(x_i.to(block.proj_in.weight.dtype))
        return torch.cat([h, h]) if guided else h

    def _token_loop(self, block: FlowBlock, z_tokens: Tensor, token_in: Tensor,
                    step: Callable[[Tensor, int], StepParams], strategy: GuidanceStrategy,
                    weight: float, guided: bool) -> Tensor:
        """The autoregressive inverse of one block, shared by the cached and static paths.

        ``step(transformer input, i)`` gives position i's (shift, log_scale) (2B rows when
        guided); after guidance, x_i = z_i·exp(log_scale) + shift becomes the next input.
        """
        z_ord = block.order(z_tokens).float()
        t = z_ord.shape[1]
        x_ord = torch.empty_like(z_ord)
        for i in range(t):
            p = self._combine(step(token_in, i), strategy, weight, i, t, guided)
            x_i = z_ord[:, i:i + 1] * torch.exp(p.log_scale) + p.shift
            x_ord[:, i:i + 1] = x_i
            if i + 1 < t:
                token_in = self._embed_token(block, x_i, guided)
        return block.order(x_ord).to(z_tokens.dtype)

    def _reverse_block_cached(self, block: FlowBlock, z_tokens: Tensor, cache: KVCache,
                              add_cond, ada_cond, query_scale, strategy, weight, guided) -> Tensor:
        cache.reset()
        batch = 2 * z_tokens.shape[0] if guided else z_tokens.shape[0]
        mods = block.modulations(ada_cond)

        def step(token_in: Tensor, i: int) -> StepParams:
            return block.step(token_in, i, cache, add_cond, ada_cond, query_scale, mods)

        return self._token_loop(block, z_tokens, block.sos.expand(batch, -1, -1), step,
                                strategy, weight, guided)

    def _reverse_block_static(self, block: FlowBlock, z_tokens: Tensor, cache: KVCache,
                              add_cond, ada_cond, query_scale, strategy, weight, guided,
                              step_fn: Callable | None) -> Tensor:
        """Token loop with identical shapes at every step; ``step_fn`` is :func:`_static_step`,
        its compiled form, or None for a per-block CUDA graph."""
        batch = 2 * z_tokens.shape[0] if guided else z_tokens.shape[0]
        mods = block.modulations(ada_cond)
        # detach + contiguous: the first input must look like the later ones (no requires_grad,
        # which a parameter's view keeps under no_grad; no 0-stride), or torch.compile recompiles.
        token_in = block.sos.detach().expand(batch, -1, -1).contiguous()
        positions = cache.positions
        if step_fn is None:
            graphed = CUDAGraphStep(block, cache, add_cond, query_scale, mods,
                                    tuple(token_in.shape), token_in.dtype)

            def step(tok: Tensor, i: int) -> StepParams:
                return StepParams(*graphed(tok, positions[i:i + 1]))
        else:
            def step(tok: Tensor, i: int) -> StepParams:
                return StepParams(*step_fn(block, tok, positions[i:i + 1], cache, add_cond,
                                           query_scale, mods))

        return self._token_loop(block, z_tokens, token_in, step, strategy, weight, guided)

    def _reverse_block_jacobi(self, block: FlowBlock, z_tokens: Tensor, cache: KVCache,
                              add_cond, ada_cond, query_scale, strategy, weight, guided,
                              chunk: int, tol: float, max_iter: int) -> tuple[Tensor, list[int]]:
        """Block-wise Jacobi inverse: each chunk of positions is a fixed point x = f(x) of the
        affine inverse given its own (guessed) earlier tokens; iterate from the guess x = z."""
        z_ord = block.order(z_tokens).float()
        b, t, _ = z_ord.shape
        x_ord = torch.empty_like(z_ord)
        batch = 2 * b if guided else b
        mods = block.modulations(ada_cond)
        first_in = block.sos.expand(batch, -1, -1)  # transformer input of the chunk's first position
        iterations = []
        for start in range(0, t, chunk):
            end = min(start + chunk, t)
            z_c = z_ord[:, start:end]
            x_c = z_c
            n_iter = min(max_iter, end - start)
            for it in range(n_iter):
                inputs = first_in if end - start == 1 else torch.cat(
                    [first_in, self._embed_token(block, x_c[:, :-1], guided)], dim=1)
                p = self._combine_chunk(block.chunk_params(inputs, start, cache, add_cond,
                                                           query_scale, mods),
                                        strategy, weight, start, t, guided)
                x_new = z_c * torch.exp(p.log_scale) + p.shift
                # Token 0 of the chunk is exact after one pass, token j after j + 1 passes.
                done = it + 1 == n_iter or bool((x_new - x_c).abs().max() <= tol)
                x_c = x_new
                if done:
                    break
            iterations.append(it + 1)
            cache.length = end
            x_ord[:, start:end] = x_c
            first_in = self._embed_token(block, x_c[:, -1:], guided)
        return block.order(x_ord).to(z_tokens.dtype), iterations

    def _reverse_block_uncached(self, block: FlowBlock, z_tokens: Tensor, add_cond, ada_cond,
                                query_scale, strategy, weight, guided) -> Tensor:
        z_ord = block.order(z_tokens).float()
        t = z_ord.shape[1]
        x_ord = torch.zeros_like(z_ord)
        for i in range(t):
            x_in = torch.cat([x_ord, x_ord]) if guided else x_ord
            h, _ = block.run_layers(block.inputs(x_in, add_cond), ada_cond, query_scale=query_scale)
            p = block.params(h[:, i:i + 1])
            p = self._combine(p, strategy, weight, i, t, guided)
            x_ord[:, i:i + 1] = z_ord[:, i:i + 1] * torch.exp(p.log_scale) + p.shift
        return block.order(x_ord).to(z_tokens.dtype)


def bits_per_dim(nll_nats: Tensor, num_dims: int, log_scale_correction: float = 0.0) -> Tensor:
    """Per-sample NLL in nats → bits per dimension.

    ``log_scale_correction`` (nats per dimension) converts a density of rescaled data back to the
    original discrete scale, e.g. ``log(127.5)`` for 8-bit pixels mapped to [−1, 1] with uniform
    dequantisation (TarFlow's convention).
    """
    return (nll_nats / num_dims + log_scale_correction) / math.log(2)
