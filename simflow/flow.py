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

This module is the model: the density direction (:meth:`TransformerFlow.to_noise`, ``forward``,
``nll``) and the one primitive the inverse needs from a block, :meth:`FlowBlock.step` (the affine
parameters of some positions given their inputs and a key/value cache of the earlier ones).
Sampling — the token-by-token inverse, guidance, and its fast paths — is :mod:`simflow.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

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
# Sampling cache interface
# --------------------------------------------------------------------------------------------
class AttentionCache(Protocol):
    """What attention needs from a key/value cache while sampling (see :mod:`simflow.sampling.cache`).

    ``attend(layer, q, k, v)`` stores the new keys/values ``k, v`` (B, heads, n, head_dim) of
    ``layer`` and returns the attention output (B, heads, n, head_dim) of the queries ``q`` over the
    cached positions and, causally, the n new ones. Where the new positions are written is the
    cache's state, advanced by the sampler."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


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
    """Causal multi-head self-attention over x (B, T, width) → (B, T, width), through SDPA.

    Without a cache (training, density) the whole sequence is processed with ``is_causal=True``
    (no explicit mask, so the flash / memory-efficient kernels apply). With an
    :class:`AttentionCache` (sampling) the new positions attend to the cached ones through it.
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

    def forward(self, x: Tensor, cache: AttentionCache | None = None, layer: int = 0,
                query_scale: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
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
        else:
            out = cache.attend(layer, q, k, v)
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

    def forward(self, x: Tensor, cond: Tensor | None, cache: AttentionCache | None = None,
                layer: int = 0, query_scale: Tensor | None = None,
                modulation: tuple[Tensor, ...] | None = None) -> Tensor:
        """x (B, t, width) → (B, t, width). ``cache``/``layer`` route attention through a sampling
        cache; ``modulation`` (from :meth:`modulation_of`) replaces computing the AdaLN terms from
        ``cond``."""
        if self.modulation is None:  # the residual adds are fused into the output matmuls
            x = self.attn(self.norm1(x), cache, layer, query_scale, residual=x)
            return self.mlp(self.norm2(x), residual=x)
        if modulation is None:
            modulation = self.modulation_of(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        # addcmul: one pass (and one temporary) per modulation instead of a product and a sum
        h = torch.addcmul(shift1, self.norm1(x), scale1)
        x = torch.addcmul(x, gate1, self.attn(h, cache, layer, query_scale))
        h = torch.addcmul(shift2, self.norm2(x), scale2)
        return torch.addcmul(x, gate2, self.mlp(h))


# --------------------------------------------------------------------------------------------
# One flow block
# --------------------------------------------------------------------------------------------
@dataclass
class StepParams:
    """Affine parameters of some token positions: x = z·exp(log_scale) + shift (the inverse of
    z = (x − shift)·exp(−log_scale)); ``shift``, ``log_scale``: (B, n, D), fp32."""

    shift: Tensor
    log_scale: Tensor


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
        """All layers over the full sequence h (B, T, width), causally; also returns the hidden
        state after layer ``hidden_at`` (or None)."""
        hidden = None
        for i, layer in enumerate(self.layers):
            h = layer(h, ada_cond, query_scale=query_scale)
            if i == hidden_at:
                hidden = h
        return h, hidden

    def forward(self, x: Tensor, add_cond: Tensor | None = None, ada_cond: Tensor | None = None,
                hidden_at: int | None = None, query_scale: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(z tokens, logdet (B,), hidden state of layer ``hidden_at`` or None), all in raster order."""
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

    def embed(self, x: Tensor) -> Tensor:
        """Transformer input of the position after each token of x (B, n, D): proj_in(x), in the
        parameters' dtype (not yet position-embedded)."""
        return self.proj_in(x.to(self.proj_in.weight.dtype))

    def step(self, inputs: Tensor, positions: slice | Tensor, cache: AttentionCache,
             add_cond: Tensor | None, ada_cond: Tensor | None, query_scale: Tensor | None,
             modulations: list[tuple[Tensor, ...]] | None = None) -> StepParams:
        """Affine parameters (B, n, D) of n consecutive positions (in this block's order) from their
        transformer inputs ``inputs`` (B, n, width): SOS or :meth:`embed` of the previous token, not
        yet position-embedded. ``positions`` is a ``slice`` of them, or a (1,) long tensor for one
        position (static shapes: no Python int, so one compiled graph / CUDA graph serves every
        token). Attention reads the earlier positions from ``cache``, which the caller positions
        and advances. ``modulations`` (from :meth:`modulations`) replaces recomputing the AdaLN
        terms of ``ada_cond`` at every call."""
        pos = (self.pos_embed[:, positions] if isinstance(positions, slice)
               else self.pos_embed.index_select(1, positions))
        h = inputs + pos
        if add_cond is not None:
            h = h + add_cond[:, None]
        for i, layer in enumerate(self.layers):
            h = layer(h, ada_cond, cache=cache, layer=i, query_scale=query_scale,
                      modulation=None if modulations is None else modulations[i])
        return self.params(h)


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

    def conditions(self, emb: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """A class embedding (B, width) or None → (additive condition, AdaLN condition) of the
        blocks, one of them None (``conditioning``)."""
        if emb is None:
            return None, None
        return (emb, None) if self.conditioning == "add" else (None, emb)

    # ---- density ------------------------------------------------------------------------------
    def to_noise(self, x: Tensor, y: Tensor | None = None, hidden_layer: int | None = None,
                 query_scale: Tensor | None = None, drop_labels: bool = True) -> FlowOutput:
        """The data → noise pass with everything it produces (:class:`FlowOutput`). ``hidden_layer``
        (global layer index counted from the data side) selects a transformer hidden state to
        return, e.g. for REPA alignment. Labels are dropped at rate ``label_drop`` in training
        unless ``drop_labels`` is False (the caller dropped them already, to share them with
        :meth:`hidden_state`)."""
        if (drop_labels and y is not None and self.class_embed is not None and self.training
                and self.label_drop > 0):
            y = self.drop_labels(y)
        add_cond, ada_cond = self.conditions(self.class_embedding(y, x.shape[0], x.device))
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

    def hidden_state(self, x: Tensor, y: Tensor | None, layer: int) -> Tensor:
        """The transformer hidden state after global layer ``layer`` (B, T, width), in raster
        order, as :meth:`to_noise` returns it, without running the layers after it (REPA's
        align-only pass). Labels are used as given (no dropout)."""
        add_cond, ada_cond = self.conditions(self.class_embedding(y, x.shape[0], x.device))
        tokens, first = patchify(x, self.patch_size), 0
        for block in self.blocks:
            if layer < first + len(block.layers):
                h = block.inputs(block.order(tokens), add_cond)
                for block_layer in block.layers[:layer - first + 1]:
                    h = block_layer(h, ada_cond)
                return block.order(h)
            tokens, _, _ = block(tokens, add_cond, ada_cond)
            first += len(block.layers)
        raise ValueError(f"layer {layer} does not exist: the flow has {first} transformer layers")

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) → (z of x's shape, logdet (B,) = log|det ∂z/∂x| in nats)."""
        out = self.to_noise(x, y)
        return out.z, out.logdet

    def nll_from(self, z: Tensor, logdet: Tensor) -> Tensor:
        """Per-sample −log p(x) in nats from a forward pass: ½‖z‖² + (D/2)·log 2π − logdet."""
        return 0.5 * z.float().pow(2).flatten(1).sum(1) + 0.5 * self.num_dims * LOG_2PI - logdet

    def nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-sample negative log-likelihood −log p(x), in nats, shape (B,)."""
        z, logdet = self(x, y)
        return self.nll_from(z, logdet)

    def class_nll(self, x: Tensor) -> Tensor:
        """−log p(x | y = c) in nats for every class c, shape (B, num_classes): the conditional
        densities that Bayes' rule turns into a classifier (TarFlow's MNIST notebook). One pass
        over the K·B (image, label) pairs. Needs eval mode: training mode drops labels."""
        if not self.num_classes:
            raise ValueError("class_nll needs a class-conditional flow (num_classes > 0)")
        if self.training:
            raise RuntimeError("class_nll in training mode would drop labels at rate label_drop; "
                               "call .eval() first")
        b, k = x.shape[0], self.num_classes
        labels = torch.arange(k, device=x.device).repeat_interleave(b)
        return self.nll(x.repeat(k, *([1] * (x.dim() - 1))), labels).view(k, b).t()

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
        are unchanged. Blocks of equal depth share one compiled graph. Deep-copying a compiled
        module is not documented by PyTorch (the training loop samples without copies, see
        ``simflow.weights.ema_weights``). Sampling is unaffected: it uses :meth:`FlowBlock.step` (its
        compiled form is ``simflow.sampling``'s ``compiled`` mode)."""
        for block in self.blocks:
            block.compile(**compile_options)
        return self


def bits_per_dim(nll_nats: Tensor, num_dims: int, log_scale_correction: float = 0.0) -> Tensor:
    """Per-sample NLL in nats → bits per dimension.

    ``log_scale_correction`` (nats per dimension) converts a density of rescaled data back to the
    original discrete scale, e.g. ``log(128)`` for 8-bit pixels dequantised onto [−1, 1) as TarFlow
    does (``simflow.model.dequantise``).
    """
    return (nll_nats / num_dims + log_scale_correction) / math.log(2)
