"""Training terms of the SimFlow VAE: reconstruction, LPIPS, PatchGAN, KL and REPA alignment.

The paper's joint loss (SimFlow, arXiv 2512.04084, §3; its README's loss file) replaces the
decoder likelihood by the terms of REPA-E's ``l1_lpips_kl_gan`` config (arXiv 2504.10483): L1
(weight 1.0) + LPIPS (1.0) + KL (1e-6) + hinge PatchGAN (0.1). SimFlow + REPA-E adds a
representation-alignment (REPA) term between projected flow hidden states and frozen DINOv2 patch
tokens (REPA, arXiv 2410.06940).

Two REPA details differ from REPA-E on purpose or by necessity:

* Index: the flow is causal, so its hidden state at token position i (in the block's order) has
  seen tokens < i and is about to transform token i. It is aligned with target token i: the
  features of the token it transforms, the index REPA uses for every token of a diffusion model.
* Weights: REPA-E trains the generator with REPA weight 0.5 and the VAE with 1.5 through a
  second pass (its diffusion loss is stop-gradiented from the VAE). SimFlow has no stop-gradient,
  so one REPA term at ``model.repa_weight`` reaches the flow and the encoder alike; its value
  for SimFlow is NOT PUBLISHED.

Conventions: images are on the [-1, 1] scale; scalar losses are means (per pixel, per logit or
per token) unless a docstring says otherwise; ``kl_loss`` is a per-sample *sum* in nats averaged
over the batch, as in REPA-E.

Offline use: nothing here downloads weights. LPIPS and DINOv2 load their backbones from local
files and raise a ``FileNotFoundError`` that says where to put them. Every frozen module stays
in eval mode even when a parent calls ``.train()``; its parameters have ``requires_grad=False``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simflow.vae import DiagonalGaussian, _num_groups

__all__ = [
    "reconstruction_loss",
    "PerceptualLoss",
    "build_perceptual_loss",
    "PatchDiscriminator",
    "hinge_discriminator_loss",
    "generator_adversarial_loss",
    "adversarial_weight",
    "kl_loss",
    "REPAProjector",
    "repa_alignment_loss",
    "TargetEncoder",
    "ModuleTargetEncoder",
    "DINOv2TargetEncoder",
    "build_target_encoder",
    "resample_tokens",
]


# --------------------------------------------------------------------------------------------
# Frozen-module helper
# --------------------------------------------------------------------------------------------


class _FrozenModule(nn.Module):
    """Base for modules that must never train: parameters frozen, always in eval mode.

    ``train(True)`` from a parent (e.g. ``vae_trainer.train()``) is ignored, so dropout
    (LPIPS's linear layers have some) and batch-norm statistics never change behaviour.
    """

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_FrozenModule":
        return super().train(False)


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------


def reconstruction_loss(
    recon: Tensor, target: Tensor, l1_weight: float = 1.0, mse_weight: float = 0.0
) -> Tensor:
    """``l1_weight·mean|recon − target| + mse_weight·mean(recon − target)²``, a scalar.

    Means are per pixel and channel over the whole batch (REPA-E's L1 convention).
    """
    if recon.shape != target.shape:
        raise ValueError(
            f"recon {tuple(recon.shape)} and target {tuple(target.shape)} must have the same shape."
        )
    if l1_weight < 0 or mse_weight < 0 or l1_weight + mse_weight == 0:
        raise ValueError(
            f"l1_weight and mse_weight must be >= 0 and not both 0; got {l1_weight}, {mse_weight}."
        )
    diff = recon - target
    loss = diff.new_zeros(())
    if l1_weight:
        loss = loss + l1_weight * diff.abs().mean()
    if mse_weight:
        loss = loss + mse_weight * diff.pow(2).mean()
    return loss


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

# torchvision file names of the ImageNet backbones that LPIPS uses (what torch.hub would cache).
_LPIPS_BACKBONES: dict[str, tuple[str, str]] = {
    "vgg": ("vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


class PerceptualLoss(_FrozenModule):
    """LPIPS distance (``lpips`` package), frozen; a scalar mean over the batch by default.

    Inputs: two image batches ``(B, 1 or 3, H, W)`` on the [-1, 1] scale; grayscale inputs are
    repeated to 3 channels. Output: a scalar (``reduction="mean"``) or ``(B,)``
    (``reduction="none"``), in LPIPS units (0 for identical images).

    Weights, all local:
      * the LPIPS linear layers ship inside the ``lpips`` package (or ``lpips_weights_path``);
      * the ImageNet backbone (torchvision VGG16 / AlexNet / SqueezeNet 1.1) is read from
        ``backbone_weights_path`` if given, else from torch hub's cache
        (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``); otherwise a
        ``FileNotFoundError`` says where to put the file. Nothing is downloaded.

    Build it only when the LPIPS weight is > 0 (use :func:`build_perceptual_loss`), so that a
    run with weight 0 needs no backbone file at all. ``random_backbone=True`` keeps the
    backbone randomly initialised (no file needed); it is for tests only, since a random
    backbone is not a perceptual metric.
    """

    def __init__(
        self,
        net: str = "vgg",
        backbone_weights_path: str | os.PathLike | None = None,
        lpips_weights_path: str | os.PathLike | None = None,
        *,
        random_backbone: bool = False,
    ):
        super().__init__()
        if net not in _LPIPS_BACKBONES:
            raise ValueError(
                f"Unknown LPIPS net {net!r}; allowed values are {', '.join(_LPIPS_BACKBONES)}."
            )
        try:
            # lazy: lpips loads torchvision (~2 CPU-s); only an LPIPS loss needs it
            import lpips
        except ImportError as err:  # pragma: no cover - lpips is a declared dependency
            raise ImportError(
                "PerceptualLoss needs the `lpips` package: `pip install lpips`, or set the "
                "perceptual (LPIPS) loss weight to 0."
            ) from err

        backbone_file = None if random_backbone else self._find_backbone(net, backbone_weights_path)
        if lpips_weights_path is not None and not Path(lpips_weights_path).is_file():
            raise FileNotFoundError(f"LPIPS linear-layer weights not found: {lpips_weights_path}.")

        with warnings.catch_warnings():
            # lpips builds its trunk with torchvision's deprecated `pretrained=` argument.
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: lpips must not try to download the trunk; we load it ourselves.
            self.lpips = lpips.LPIPS(
                net=net,
                pnet_rand=True,
                pretrained=True,
                model_path=None if lpips_weights_path is None else str(lpips_weights_path),
                verbose=False,
            )
        if backbone_file is not None:
            self._load_backbone(self.lpips.net, backbone_file, net)
        self.net_name = net
        self._freeze()

    @staticmethod
    def _find_backbone(net: str, path: str | os.PathLike | None) -> Path:
        arch, url = _LPIPS_BACKBONES[net]
        filename = url.rsplit("/", 1)[-1]
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"LPIPS backbone weights not found at backbone_weights_path={str(path)!r}. "
                    f"It should be torchvision's {arch} ImageNet state dict ({filename}, from {url})."
                )
            return Path(path)
        cached = _hub_checkpoint(filename)
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet {arch} backbone weights and will not download them. Either "
            f"pass backbone_weights_path=<file>, or place {filename} (from {url}) at {cached} "
            "(torch hub's cache; set TORCH_HOME to move it). Setting the perceptual (LPIPS) "
            "loss weight to 0 disables LPIPS and needs no weights."
        )

    @staticmethod
    def _load_backbone(trunk: nn.Module, file: Path, net: str) -> None:
        """Copy torchvision ``features.*`` weights into lpips' sliced trunk (same indices)."""
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        # lpips splits `features` into slices whose children keep the original indices, so
        # `slice2.5.weight` is torchvision's `features.5.weight`.
        prefix = "features." if any(k.startswith("features.") for k in state) else ""
        wanted: dict[str, Tensor] = {}
        for slice_name, block in trunk.named_children():
            if not slice_name.startswith("slice"):
                continue
            for name, tensor in block.state_dict().items():
                wanted[f"{prefix}{name}"] = tensor
        missing = [k for k in wanted if k not in state]
        bad = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
        if missing or bad:
            raise ValueError(
                f"{file} is not a torchvision {_LPIPS_BACKBONES[net][0]} state dict for LPIPS "
                f"net={net!r}: missing keys {missing[:4]}, shape mismatches {bad[:4]}."
            )
        with torch.no_grad():
            for key, tensor in wanted.items():
                tensor.copy_(state[key])

    def forward(self, pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] not in (1, 3):
            raise ValueError(
                "PerceptualLoss expects two (B, 1 or 3, H, W) batches of the same shape; got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}."
            )
        if pred.shape[1] == 1:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        dist = self.lpips(pred, target).flatten()  # (B,), inputs already in [-1, 1]
        if reduction == "mean":
            return dist.mean()
        if reduction == "none":
            return dist
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}.")


def build_perceptual_loss(
    weight: float,
    net: str = "vgg",
    backbone_weights_path: str | os.PathLike | None = None,
    lpips_weights_path: str | os.PathLike | None = None,
) -> PerceptualLoss | None:
    """A :class:`PerceptualLoss` if ``weight > 0``, else ``None`` (nothing loaded)."""
    if weight < 0:
        raise ValueError(f"The perceptual loss weight must be >= 0; got {weight}.")
    if weight == 0:
        return None
    return PerceptualLoss(net, backbone_weights_path, lpips_weights_path)


# --------------------------------------------------------------------------------------------
# PatchGAN discriminator and adversarial terms
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN ``NLayerDiscriminator`` (pix2pix / taming-transformers), one logit per patch.

    ``(B, in_channels, H, W)`` in [-1, 1] → logits ``(B, 1, H', W')``. Layout: conv4x4/s2 +
    LeakyReLU(0.2); ``n_layers − 1`` × [conv4x4/s2 + norm + LeakyReLU]; conv4x4/s1 + norm +
    LeakyReLU; conv4x4/s1 → 1 channel. Widths ``base_channels · min(2^k, 8)``.

    Each stride-2 layer halves the size and each stride-1 4×4 conv (padding 1) removes one
    pixel, so ``H' = H / 2^n_layers − 2``. It needs ``H, W >= 2^n_layers · 3``: 32×32 works with
    ``n_layers <= 3``; :meth:`max_layers_for` gives the largest valid depth for a size.

    Normalisation: ``norm="group"`` (default) uses GroupNorm. Unlike BatchNorm (taming's
    default), a sample's logits then do not depend on the other samples in the batch or on
    whether real and fake images are passed in one call or two; it works at batch size 1 and
    needs no SyncBatchNorm under DDP. ``norm="batch"`` gives the taming/REPA-E behaviour.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        image_size: int | None = None,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1; got {n_layers}.")
        if norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch'; got {norm!r}.")
        if image_size is not None and n_layers > self.max_layers_for(image_size):
            raise ValueError(
                f"n_layers={n_layers} is too deep for {image_size}x{image_size} images; use "
                f"n_layers <= {self.max_layers_for(image_size)}."
            )
        self.n_layers = n_layers

        def norm_layer(ch: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(ch)
            return nn.GroupNorm(_num_groups(ch), ch)

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for k in range(1, n_layers + 1):
            prev, mult = mult, min(2**k, 8)
            stride = 2 if k < n_layers else 1
            layers += [
                # No conv bias before a normalisation layer (it would be cancelled).
                nn.Conv2d(
                    base_channels * prev,
                    base_channels * mult,
                    4,
                    stride=stride,
                    padding=1,
                    bias=False,
                ),
                norm_layer(base_channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def max_layers_for(image_size: int) -> int:
        """Largest ``n_layers`` that leaves at least a 1×1 logit map for ``image_size``."""
        n = 0
        while image_size // 2 ** (n + 1) - 2 >= 1 and (n + 1) <= 8:
            n += 1
        return n

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # pix2pix / taming initialisation.
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if min(h, w) // 2**self.n_layers - 2 < 1:
            raise ValueError(
                f"Images of size {h}x{w} are too small for a PatchDiscriminator with n_layers="
                f"{self.n_layers}; use n_layers <= {self.max_layers_for(min(h, w))}."
            )
        return self.main(images)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5·(mean relu(1 − D(real)) + mean relu(1 + D(fake)))``, a scalar (taming's hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """Hinge generator loss ``−mean D(fake)``, a scalar."""
    return -logits_fake.mean()


def adversarial_weight(step: int, start_step: int, weight: float) -> float:
    """``weight`` from ``start_step`` on, 0 before (the discriminator warm-up of taming/REPA-E)."""
    return float(weight) if step >= start_step else 0.0


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """Batch mean of ``KL(q(x|i) || N(0, I))`` summed over latent dims (nats per sample)."""
    return posterior.kl().mean()


# --------------------------------------------------------------------------------------------
# REPA: representation alignment
# --------------------------------------------------------------------------------------------


class REPAProjector(nn.Module):
    """Token-wise MLP ``(B, N, in_dim) → (B, N, out_dim)``: Linear → SiLU → Linear → SiLU → Linear.

    REPA's ``build_mlp`` with ``hidden_dim=2048`` and ``out_dim=768`` for DINOv2-B targets.
    """

    def __init__(self, in_dim: int, out_dim: int = 768, hidden_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


def repa_alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Mean over batch and tokens of ``−cos(projected, target)``; a scalar in [-1, 1].

    Both are ``(B, N, D)``; each token is L2-normalised first, so −1 means perfect alignment.
    """
    if projected.shape != target.shape or projected.ndim != 3:
        raise ValueError(
            f"repa_alignment_loss expects two (B, N, D) tensors of the same shape; got "
            f"{tuple(projected.shape)} and {tuple(target.shape)}. Match the token grids with "
            "resample_tokens and the widths with REPAProjector(out_dim=D)."
        )
    cos = (F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
    return -cos.mean()


def resample_tokens(tokens: Tensor, grid: int) -> Tensor:
    """Bilinearly resize a square token grid: ``(B, N, D) → (B, grid·grid, D)``.

    Tokens are in row-major order on a ``√N × √N`` grid (ViT / flow patch order). Unchanged
    size returns the input as is. Used to match the target encoder's token count (e.g. 16×16
    for DINOv2-B at 224 px) with the flow's.
    """
    if tokens.ndim != 3:
        raise ValueError(f"resample_tokens expects (B, N, D) tokens; got {tuple(tokens.shape)}.")
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"resample_tokens needs a square token grid; N={n} is not a square.")
    if grid < 1:
        raise ValueError(f"grid must be >= 1; got {grid}.")
    if grid == side:
        return tokens
    x = tokens.transpose(1, 2).reshape(b, d, side, side)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.reshape(b, d, grid * grid).transpose(1, 2)


class TargetEncoder(_FrozenModule):
    """Interface of a frozen REPA target: images ``(B, C, H, W)`` in [-1, 1] → tokens ``(B, N, D)``.

    Subclasses implement :meth:`encode`; ``forward`` runs it without gradients. The module is
    frozen and stays in eval mode.
    """

    def encode(self, images: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(
                f"TargetEncoder expects (B, C, H, W) images; got {tuple(images.shape)}."
            )
        with torch.no_grad():
            tokens = self.encode(images)
        if tokens.ndim != 3:
            raise ValueError(
                f"The target encoder must return (B, N, D) patch tokens; got {tuple(tokens.shape)}."
            )
        return tokens


class ModuleTargetEncoder(TargetEncoder):
    """Wraps a user ``nn.Module`` that already maps [-1, 1] images to ``(B, N, D)`` tokens."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module= must be an nn.Module; got {type(module).__name__}.")
        self.module = module
        self._freeze()

    def encode(self, images: Tensor) -> Tensor:
        return self.module(images)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DINOV2_KIND = re.compile(r"^dinov2_vit[sblg]14(_reg)?$")


class DINOv2TargetEncoder(TargetEncoder):
    """DINOv2 ``x_norm_patchtokens`` as REPA targets: ``(B, C, H, W)`` → ``(B, (R/14)², D)``.

    Preprocessing (REPA-E): [-1, 1] → [0, 1], grayscale repeated to RGB, ImageNet mean/std
    normalisation, bicubic resize to ``resolution`` (224 → 16×16 = 256 tokens; D = 768 for
    ViT-B/14). ``model`` is a DINOv2 model as built by the official hub entry points.
    """

    def __init__(self, model: nn.Module, resolution: int = 224):
        super().__init__()
        if resolution % 14:
            raise ValueError(
                f"DINOv2 resolution must be a multiple of the patch size 14; got {resolution}."
            )
        self.model = model
        self.resolution = resolution
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def encode(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = ((images.float() + 1.0) / 2.0 - self.mean) / self.std
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False
            )
        return self.model.forward_features(x)["x_norm_patchtokens"]


def _load_dinov2(
    kind: str, repo_dir: str | os.PathLike | None, checkpoint_path: str | os.PathLike | None
) -> nn.Module:
    # The official file names: dinov2_vitb14_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth.
    base = kind.removesuffix("_reg")
    filename = f"{base}_reg4_pretrain.pth" if kind.endswith("_reg") else f"{base}_pretrain.pth"
    how = (
        "Clone https://github.com/facebookresearch/dinov2 and pass its directory as "
        f"weights_path=<repo dir>; put the weights file {filename} (from "
        f"https://dl.fbaipublicfiles.com/dinov2/{base}/{filename}) in that directory or in "
        f"{_hub_checkpoint('')}, or pass checkpoint_path=<file>. Or set the REPA weight to 0."
    )
    if repo_dir is None or not (Path(repo_dir) / "hubconf.py").is_file():
        raise FileNotFoundError(
            f"The {kind} target encoder needs a local DINOv2 repository (a directory with "
            f"hubconf.py); got weights_path={None if repo_dir is None else str(repo_dir)!r}. {how}"
        )
    candidates = (
        [Path(checkpoint_path)]
        if checkpoint_path is not None
        else [Path(repo_dir) / filename, _hub_checkpoint(filename)]
    )
    ckpt = next((p for p in candidates if p.is_file()), None)
    if ckpt is None:
        raise FileNotFoundError(
            f"No {kind} weights found (looked at {', '.join(map(str, candidates))}). {how}"
        )
    # pretrained=False: the hub entry point would otherwise download the weights.
    model = torch.hub.load(str(repo_dir), kind, source="local", pretrained=False)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    return model


def build_target_encoder(
    kind: str, weights_path: str | os.PathLike | None = None, **kw
) -> TargetEncoder:
    """Build a frozen REPA target encoder.

    Kinds:
      * ``"dinov2_vitb14"`` (also other ``dinov2_vit{s,b,l,g}14[_reg]``): ``weights_path`` is a
        local clone of facebookresearch/dinov2 loaded with ``torch.hub.load(...,
        source="local")``; the weights come from ``checkpoint_path=`` or
        ``<repo>/<kind>_pretrain.pth`` or torch hub's cache. Optional ``resolution=`` (224).
      * ``"module"``: pass ``module=<nn.Module>`` that maps [-1, 1] images to ``(B, N, D)``
        tokens; ``weights_path`` must be None (load the module's weights yourself).
    """
    if kind == "module":
        if "module" not in kw:
            raise ValueError("build_target_encoder('module', ...) needs module=<nn.Module>.")
        if weights_path is not None:
            raise ValueError(
                "weights_path is not used with kind='module'; load the module's weights first."
            )
        return ModuleTargetEncoder(kw.pop("module"))
    if _DINOV2_KIND.match(kind):
        model = _load_dinov2(kind, weights_path, kw.pop("checkpoint_path", None))
        return DINOv2TargetEncoder(model, **kw)
    raise ValueError(
        f"Unknown target encoder kind {kind!r}; allowed values are 'dinov2_vitb14' (or another "
        "dinov2_vit{s,b,l,g}14[_reg]) and 'module'."
    )
