"""The VAE of SimFlow: an LDM / REPA-E style ResNet convolutional autoencoder.

SimFlow (arXiv 2512.04084) encodes an image ``i`` into latent tokens ``x ~ q(x|i) = N(mu(i), std²)``.
Its one change to an ordinary VAE is that the encoder predicts only the mean and the posterior
std is a *fixed* constant sigma_bar (0.5 in the paper's main setting). That noise acts as
intrinsic noise augmentation for the normalizing flow that models ``x``, and it makes the entropy
of ``q`` a constant, which is what keeps joint VAE+flow training stable.

The architecture follows the latent-diffusion ``AutoencoderKL`` that REPA-E uses (arXiv 2504.10483; docs/sources.md):
``vae_f16d64`` is ``channel_mult=(1, 1, 2, 2, 4)``, ``base_channels=128``, ``num_res_blocks=2``,
attention at 16×16 and ``latent_channels=64``, i.e. a 256×256 image becomes 16×16×64. The
defaults here are much smaller so the module runs on a CPU in tests and demos.

Three posterior modes reproduce the VAE variants of the paper's variant study (its Figure 5):

``fixed``
    SimFlow ("Fixed var"). The encoder predicts the mean only; std ≡ ``fixed_std``.
``learnable``
    A standard VAE ("Learnable var" / "End-to-end"). The encoder also predicts the log-variance,
    clamped to [-30, 20] as in LDM; std = exp(logvar / 2).
``layernorm``
    The paper's "LN" variant. **INFERRED** definition (the paper's text was not available):
    the latent scale is controlled by normalising the mean, not by fixing the std. The mean is
    the encoder output passed through a LayerNorm over the channel dimension at each spatial
    position, with no affine parameters (so each latent token has zero mean and unit variance
    over its channels); the log-variance is predicted as in ``learnable``.

Decoder output: images on the [-1, 1] scale of the inputs but **not squashed** (no final tanh),
as in LDM. The reconstruction losses compare the raw output with the target, which keeps
gradients alive for pixels near ±1; clamp to [-1, 1] only when converting to an image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["POSTERIOR_MODES", "DiagonalGaussian", "VAE"]

#: The posterior parameterisations understood by :class:`VAE`.
POSTERIOR_MODES: tuple[str, ...] = ("fixed", "learnable", "layernorm")

# LDM clamps the predicted log-variance to this range so that exp() cannot overflow or vanish.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0
_LAYERNORM_EPS = 1e-6


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether shapes ``a`` and ``b`` broadcast together (NumPy / PyTorch rules)."""
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


class DiagonalGaussian:
    """A diagonal Gaussian posterior ``q(x|i) = N(mean, diag(std²))`` over latent tensors.

    Shapes: ``mean`` is ``(B, C, h, w)``; ``std`` has the same shape (the VAE always passes a
    full tensor) or any shape broadcastable to it. Units: latent units; ``kl``, ``entropy`` and
    ``log_prob`` are in nats, summed over all ``C·h·w`` latent dimensions, one value per sample.

    Build it from either ``std`` or ``logvar`` (keyword). Passing ``logvar`` keeps the exact
    log-variance for ``kl``/``entropy`` instead of recomputing ``2·log(std)``.
    """

    def __init__(self, mean: Tensor, std: Tensor | None = None, *, logvar: Tensor | None = None):
        if (std is None) == (logvar is None):
            raise ValueError("DiagonalGaussian needs exactly one of std= or logvar=.")
        self.mean = mean
        if logvar is not None:
            self._logvar = logvar
            self.std = torch.exp(0.5 * logvar)
        else:
            assert std is not None
            self._logvar = None
            self.std = std
        # A plain shape check: torch.broadcast_shapes imports torch._refs and with it sympy, about
        # 0.3 CPU seconds in every stage process that encodes an image.
        if not _broadcastable(tuple(self.std.shape), tuple(mean.shape)):
            raise ValueError(
                f"std of shape {tuple(self.std.shape)} does not broadcast to mean of shape "
                f"{tuple(mean.shape)}."
            )

    @property
    def logvar(self) -> Tensor:
        """Log-variance, same shape as ``std``."""
        if self._logvar is not None:
            return self._logvar
        return 2.0 * torch.log(self.std)

    @property
    def var(self) -> Tensor:
        return self.std * self.std

    def _full(self, t: Tensor) -> Tensor:
        # Broadcast a (possibly smaller) std-shaped tensor to the mean's shape so that sums
        # over latent dimensions count every dimension once.
        return t.expand_as(self.mean) if t.shape != self.mean.shape else t

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``mean + std·eps``, ``eps ~ N(0, I)``; shape of ``mean``.

        Differentiable with respect to ``mean`` and ``std``. ``generator`` (on the mean's device)
        makes the noise reproducible.
        """
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior mode (= mean), shape ``(B, C, h, w)``."""
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per sample, shape ``(B,)``, nats summed over all latent dims.

        ``0.5·Σ(mean² + var − 1 − logvar)``. With a fixed std it depends on the encoder only
        through ``Σ mean²`` (a weak L2 on the means at the usual weight 1e-6, docs/sources.md).
        """
        var = self._full(self.var)
        logvar = self._full(self.logvar)
        per_dim = self.mean.pow(2) + var - 1.0 - logvar
        return 0.5 * per_dim.flatten(1).sum(dim=1)

    def entropy(self) -> Tensor:
        """Differential entropy ``H(q)`` per sample, shape ``(B,)``, nats summed over dims.

        ``0.5·Σ(log(2πe) + logvar)``; a constant ``(D/2)·log(2πe·σ̄²)`` in ``fixed`` mode.
        """
        logvar = self._full(self.logvar)
        return 0.5 * (math.log(2.0 * math.pi * math.e) + logvar).flatten(1).sum(dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x|i)`` per sample, shape ``(B,)``, nats summed over latent dims."""
        logvar = self._full(self.logvar)
        per_dim = (x - self.mean).pow(2) / self._full(self.var) + logvar + math.log(2.0 * math.pi)
        return -0.5 * per_dim.flatten(1).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Building blocks (LDM "taming" style)
# --------------------------------------------------------------------------------------------


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (32 for LDM widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm → SiLU → conv3x3) × 2 with dropout in between.

    ``(B, in_ch, H, W) -> (B, out_ch, H, W)``; a 1×1 conv shortcut when the widths differ.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: ``(B, C, H, W) -> (B, C, H, W)``.

    Every one of the ``H·W`` positions attends to all others (LDM ``AttnBlock``); the cost is
    quadratic in ``H·W``, so use it only at low resolutions (16×16 in f16d64).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        # (B, HW, C) each; add a singleton head dimension for SDPA.
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv, ``(B, C, H, W) -> (B, C, H/2, W/2)``; LDM's asymmetric padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right/bottom only so that an even H maps exactly to H/2 (as in LDM).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 upsampling followed by a 3×3 conv, ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet → (attention) → ResNet at the lowest resolution, width preserved."""

    def __init__(self, channels: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` → features ``(B, out_channels, H/f, W/f)``, ``f = 2^(L-1)``.

    conv_in → per level: ``num_res_blocks`` ResNet blocks (+ attention where the level is listed)
    → stride-2 downsample between levels → mid block → GroupNorm/SiLU → conv_out.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_levels: frozenset[int],
        dropout: float,
        mid_attention: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            stage = nn.Module()
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, out_ch, dropout))
                ch = out_ch
                attns.append(AttnBlock(ch) if level in attn_levels else nn.Identity())
            stage.block, stage.attn = blocks, attns
            stage.downsample = Downsample(ch) if level < len(channel_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = MidBlock(ch, dropout, mid_attention)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block, attn in zip(stage.block, stage.attn):
                h = attn(block(h))
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``(B, latent_channels, h, w)`` → images ``(B, out_channels, h·f, w·f)``.

    Mirror of :class:`Encoder`: conv_in → mid block → per level (coarsest first):
    ``num_res_blocks + 1`` ResNet blocks (+ attention) → nearest ×2 upsample + conv → GroupNorm/
    SiLU → conv_out. No output nonlinearity (see the module docstring).
    """

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_levels: frozenset[int],
        dropout: float,
        mid_attention: bool,
    ):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, dropout, mid_attention)
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            stage = nn.Module()
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            out_ch = base_channels * channel_mult[level]
            # LDM's decoder has one more block per level than the encoder.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, out_ch, dropout))
                ch = out_ch
                attns.append(AttnBlock(ch) if level in attn_levels else nn.Identity())
            stage.block, stage.attn = blocks, attns
            stage.upsample = Upsample(ch) if level > 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for block, attn in zip(stage.block, stage.attn):
                h = attn(block(h))
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """Convolutional VAE with a selectable posterior (``fixed`` / ``learnable`` / ``layernorm``).

    Shapes: images ``(B, in_channels, H, W)`` on the [-1, 1] scale, with ``H`` and ``W``
    divisible by ``downsample_factor``; latents ``(B, latent_channels, H/f, W/f)`` with
    ``f = downsample_factor = 2 ** (len(channel_mult) - 1)`` (lengths 1..5 give f = 1..16).

    Args:
        in_channels: image channels (3 for RGB, 1 for grayscale).
        latent_channels: ``C`` of the latent (64 in SimFlow's f16d64).
        base_channels: width of the first level; level ``k`` has ``base_channels·channel_mult[k]``.
        channel_mult: width multiplier per level; its length sets the downsampling factor.
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more).
        attn_resolutions: spatial sizes (of the feature map, e.g. ``(16,)``) at which the
            encoder/decoder levels get self-attention. Needs ``resolution``.
        posterior: ``"fixed"`` (SimFlow, std ≡ ``fixed_std``), ``"learnable"`` (predicted,
            clamped log-variance) or ``"layernorm"`` (channel-LayerNormed mean + predicted
            log-variance; INFERRED definition of the paper's "LN" variant). See module docstring.
        fixed_std: sigma_bar of the ``fixed`` posterior (0.5 in the paper). Ignored otherwise.
        logvar_init: initial bias of the predicted log-variance in ``learnable``/``layernorm``
            modes (so the initial std is about ``exp(logvar_init / 2)``). Ignored in ``fixed``.
        dropout: dropout rate inside the ResNet blocks.
        resolution: input image size the model is built for; only used to place the attention
            levels (level ``k`` runs at ``resolution / 2**k``). The network itself accepts any
            size divisible by ``downsample_factor``.
        mid_attention: self-attention in the encoder/decoder mid blocks (LDM always has it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (),
        posterior: str = "fixed",
        fixed_std: float = 0.5,
        logvar_init: float = 0.0,
        dropout: float = 0.0,
        resolution: int | None = None,
        mid_attention: bool = True,
    ):
        super().__init__()
        if posterior not in POSTERIOR_MODES:
            raise ValueError(
                f"Unknown posterior {posterior!r}; allowed values are {', '.join(POSTERIOR_MODES)}."
            )
        channel_mult = tuple(int(m) for m in channel_mult)
        if not 1 <= len(channel_mult) <= 5 or any(m < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult must have 1 to 5 positive entries (downsampling 1..16); got "
                f"{channel_mult}."
            )
        for name, value in (
            ("in_channels", in_channels),
            ("latent_channels", latent_channels),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1; got {value}.")
        if posterior == "fixed" and not (fixed_std > 0 and math.isfinite(fixed_std)):
            raise ValueError(f"fixed_std must be a positive finite number; got {fixed_std}.")
        if posterior == "layernorm" and latent_channels < 2:
            raise ValueError(
                "posterior='layernorm' normalises over latent channels and needs "
                f"latent_channels >= 2; got {latent_channels}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}.")

        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.posterior = posterior
        self.fixed_std = float(fixed_std)
        self.channel_mult = channel_mult
        self.downsample_factor: int = 2 ** (len(channel_mult) - 1)

        attn_levels = self._attention_levels(tuple(attn_resolutions), resolution, channel_mult)
        # Fixed mode predicts only the mean; the other modes predict mean and log-variance.
        moments = latent_channels if posterior == "fixed" else 2 * latent_channels
        common = dict(
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attn_levels=attn_levels,
            dropout=dropout,
            mid_attention=mid_attention,
        )
        self.encoder = Encoder(in_channels, moments, **common)
        self.decoder = Decoder(latent_channels, in_channels, **common)
        # The 1x1 "quant" convs of LDM's AutoencoderKL, kept so f16d64 matches REPA-E's layout.
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        if posterior != "fixed":
            with torch.no_grad():
                self.quant_conv.bias[latent_channels:].fill_(float(logvar_init))

    @staticmethod
    def _attention_levels(
        attn_resolutions: tuple[int, ...], resolution: int | None, channel_mult: tuple[int, ...]
    ) -> frozenset[int]:
        if not attn_resolutions:
            return frozenset()
        if resolution is None:
            raise ValueError(
                f"attn_resolutions={attn_resolutions} needs resolution= (the input image size) to "
                "know which levels run at those spatial sizes."
            )
        level_res = [resolution // 2**k for k in range(len(channel_mult))]
        missing = [r for r in attn_resolutions if r not in level_res]
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} are never reached with resolution={resolution} and "
                f"{len(channel_mult)} levels; the level sizes are {level_res}."
            )
        return frozenset(k for k, r in enumerate(level_res) if r in attn_resolutions)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent for an image of the given size."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self._check_divisible(hw)
        return (
            self.latent_channels,
            hw[0] // self.downsample_factor,
            hw[1] // self.downsample_factor,
        )

    def _check_divisible(self, hw: tuple[int, ...]) -> None:
        f = self.downsample_factor
        if hw[0] % f or hw[1] % f:
            raise ValueError(
                f"Image size {tuple(hw)} is not divisible by the downsampling factor {f}; resize "
                "or crop the images, or use a shorter channel_mult."
            )

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images ``(B, in_channels, H, W)`` in [-1, 1] → posterior over ``(B, C, H/f, W/f)``."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"encode expects images of shape (B, {self.in_channels}, H, W); got "
                f"{tuple(images.shape)}."
            )
        self._check_divisible(tuple(images.shape[-2:]))
        moments = self.quant_conv(self.encoder(images))
        c = self.latent_channels
        if self.posterior == "fixed":
            # A constant tensor, not a parameter: no gradient can change the posterior std.
            return DiagonalGaussian(moments, torch.full_like(moments, self.fixed_std))
        mean, logvar = moments[:, :c], moments[:, c:]
        logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        if self.posterior == "layernorm":
            # LayerNorm over channels at each position, no affine: (B,C,h,w) -> (B,h,w,C) -> back.
            mean = F.layer_norm(mean.movedim(1, -1), (c,), eps=_LAYERNORM_EPS).movedim(-1, 1)
        return DiagonalGaussian(mean, logvar=logvar)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, h, w)`` → images ``(B, in_channels, h·f, w·f)`` (unclamped, [-1, 1] scale)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.latent_channels}, h, w); got "
                f"{tuple(latents.shape)}."
            )
        return self.decoder(self.post_quant_conv(latents))

    def forward(
        self,
        images: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussian, Tensor]:
        """Encode, draw latents (a reparameterised sample, or the mode), decode.

        Returns ``(recon (B, in_channels, H, W), posterior, latents (B, C, H/f, W/f))``.
        """
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents), posterior, latents
