"""The demo's classifier: the FID feature extractor on the offline dataset, and the REPA target.

Fashion-MNIST at 32x32 grayscale has no meaningful Inception features, and the weights are not
available offline. The demo therefore trains :class:`SmallClassifier` (a small CNN) on the data
set (:func:`train_feature_extractor`), and uses it twice: registered with
torch-fidelity as the FID/IS feature extractor (:func:`simflow.fid.register_classifier_extractor`),
and, frozen, as the REPA target encoder (:func:`classifier_patch_tokens`, its intermediate conv
map). Building the model needs this module only, not the FID machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from simflow.io import atomic_write

__all__ = [
    "ClassifierPatchTokens",
    "SmallClassifier",
    "classifier_patch_tokens",
    "load_classifier",
    "match_input",
    "save_classifier",
    "train_feature_extractor",
]

_CHECKPOINT_FORMAT = "simflow-classifier-v1"


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm (not BatchNorm) so that train() and eval() compute the same function: the network is
    # used frozen as a metric and as a REPA target, and must not depend on batch composition.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
    )


class SmallClassifier(nn.Module):
    """A small CNN classifier for (B, C, S, S) float images in [-1, 1] (C = 1 or 3, S = 32 by default).

    Layout: three conv stages of width ``w``, ``2w``, ``4w`` at S, S/2 and S/4 (average pooling in
    between). ``patch_map`` is the last stage's map, (B, 4w, S/4, S/4), used as REPA patch tokens;
    ``forward_features`` global-averages it and applies a linear layer to the ``feature_dim``-d
    penultimate features (the FID features), followed by SiLU and the class logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128, image_size: int = 32) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"SmallClassifier supports 1 or 3 input channels, got {in_channels}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim, image_size=image_size)
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.stage1 = _conv_block(in_channels, width)
        self.stage2 = _conv_block(width, 2 * width)
        self.stage3 = _conv_block(2 * width, 4 * width)
        self.to_features = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def patch_dim(self) -> int:
        return self.stage3[0].out_channels

    def patch_map(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, 4w, S/4, S/4) conv features."""
        x = F.avg_pool2d(self.stage1(x), 2)
        x = F.avg_pool2d(self.stage2(x), 2)
        return self.stage3(x)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, S, S) -> (features (B, feature_dim), logits (B, num_classes))."""
        feats = self.to_features(self.patch_map(x).mean(dim=(2, 3)))
        return feats, self.head(F.silu(feats))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]


def match_input(x: Tensor, in_channels: int, image_size: int) -> Tensor:
    """Adapt a float (B, C, H, W) batch to the classifier: channel count and spatial size."""
    if x.shape[1] != in_channels:
        if in_channels == 1:
            x = x.mean(dim=1, keepdim=True)  # grayscale repeated to RGB: the mean is exact
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {in_channels}-channel classifier")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > image_size)
    return x


def load_classifier(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> SmallClassifier:
    """Load a :class:`SmallClassifier` written by :func:`train_feature_extractor` (eval
    mode, frozen)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint not found: {path}. Train it first (train_feature_extractor / the "
            "'feature_extractor' workflow rule)."
        )
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a simflow classifier checkpoint (expected format {_CHECKPOINT_FORMAT!r})")
    model = SmallClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.requires_grad_(False)
    return model.eval()


def save_classifier(model: SmallClassifier, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a checkpoint that :func:`load_classifier` reads (atomically, tensors on CPU)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": _CHECKPOINT_FORMAT, "config": dict(model.config), "state_dict": state, "metrics": dict(metrics or {})}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


class ClassifierPatchTokens(nn.Module):
    """Frozen patch-token encoder for REPA: float images (B, C, H, W) in [-1, 1] -> tokens (B, N, D).

    The tokens are the classifier's last conv stage (:meth:`SmallClassifier.patch_map`), D = 4 * width,
    N = (S/4)^2 for the classifier's image size S (64 tokens at 32x32), or ``grid_size``^2 when a grid is
    given (adaptive average pooling, to match the flow's token count). Inputs are resized and their
    channels adapted to the classifier. The module never trains and returns no gradient (it is a target).
    """

    def __init__(self, classifier: SmallClassifier, grid_size: int | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.grid_size = grid_size
        self.embed_dim = classifier.patch_dim
        side = grid_size if grid_size is not None else classifier.image_size // 4
        self.num_patches = side * side

    def train(self, mode: bool = True) -> "ClassifierPatchTokens":
        # A frozen target stays in eval mode even when a parent module calls .train().
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = match_input(images.float(), self.classifier.in_channels, self.classifier.image_size)
        fmap = self.classifier.patch_map(x)
        if self.grid_size is not None and fmap.shape[-1] != self.grid_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)
        return fmap.flatten(2).transpose(1, 2).contiguous()


def classifier_patch_tokens(checkpoint_path: str | Path, grid_size: int | None = None) -> ClassifierPatchTokens:
    """The demo's frozen REPA target encoder: see :class:`ClassifierPatchTokens`."""
    return ClassifierPatchTokens(load_classifier(checkpoint_path), grid_size)


def train_feature_extractor(
    dataset: Dataset,
    out_path: str | Path,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    eval_dataset: Dataset | None = None,
    width: int = 32,
    feature_dim: int = 128,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train a :class:`SmallClassifier` on ``dataset`` ((float image, label) items) and save its checkpoint.

    AdamW with a cosine learning-rate decay over ``steps`` steps of ``batch_size`` images drawn with
    replacement (seeded), loaded by ``num_workers`` worker processes (``data.num_workers``). Returns
    ``{"accuracy", "accuracy_split", "final_loss", "steps", "num_params", "checkpoint"}``; accuracy is on ``eval_dataset`` when given, else on (up to 5000 of) the training images.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    image, _ = dataset[0]
    if image.dim() != 3 or image.shape[-1] != image.shape[-2]:
        raise ValueError(f"train_feature_extractor expects square (C, S, S) images, got {tuple(image.shape)}")
    num_classes = int(getattr(dataset, "num_classes", 10))
    torch.manual_seed(seed)
    model = SmallClassifier(image.shape[0], num_classes, width, feature_dim, image.shape[-1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=gen)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=num_workers)
    model.train()
    loss = torch.tensor(float("nan"))
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()

    if eval_dataset is None:
        split, eval_ds = "train", torch.utils.data.Subset(dataset, range(min(5000, len(dataset))))
    else:
        split, eval_ds = "eval", eval_dataset
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(eval_ds, batch_size=512, num_workers=num_workers):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    result = {
        "accuracy": correct / total,
        "accuracy_split": split,
        "final_loss": float(loss.item()),
        "steps": steps,
        "num_params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(out_path),
    }
    save_classifier(model, out_path, metrics={k: v for k, v in result.items() if k != "checkpoint"})
    return result
