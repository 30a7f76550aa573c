"""Sample-quality metrics (FID, IS, KID, precision/recall) through torch-fidelity, plus the demo's proxy extractor.

Formats and conventions
-----------------------
* Samples are ``.npz`` files whose key ``arr_0`` holds uint8 NHWC images (C = 1 or 3), the format of
  the ADM evaluator (openai/guided-diffusion ``evaluations/``); optional ``arr_1`` holds the labels.
  :func:`simflow.io.save_samples_npz` writes them and :func:`simflow.io.load_npz_array` reads them.
* Float images in [-1, 1] become uint8 with DiT's formula ``clamp(127.5 * x + 128, 0, 255).to(uint8)``,
  which truncates: -1 -> 0 (0.5 truncated), 0 -> 128, 1 -> 255 (255.5 clamped). Reference images from
  a simflow dataset go through the same conversion, so samples and references are quantised alike.
* FID: the sample features' mean/covariance come from torch-fidelity's feature extractor and are
  compared with cached reference statistics (``mu``, ``sigma``) by torch-fidelity's own Fréchet
  function. The reference may be a file written by :func:`compute_reference_statistics` or ADM's
  ``VIRTUAL_imagenet256_labeled.npz`` (Inception pool3 ``mu``/``sigma`` of the whole ImageNet train set),
  which makes ImageNet numbers comparable with published gFID.
* Inception weights are never bundled (no package ships them): torch-fidelity downloads them to
  ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` when online; offline, put
  the file there or pass its path (config key ``eval.feature_extractor_weights_path``).

The demo proxy
--------------
Fashion-MNIST at 32x32 grayscale has no meaningful Inception features, and the weights are not
available offline. The demo therefore trains :class:`simflow.classifier.SmallClassifier` (a small
CNN) on the data set and registers it with torch-fidelity (:func:`register_classifier_extractor`):
"FID" then means the Fréchet distance between Gaussians fitted to that classifier's 128-d
penultimate features, and "IS" uses its 10 logits. These are honest proxies for ranking models on
the demo; **their values are not comparable with Inception FID/IS numbers** in any paper. The
classifier's intermediate conv map also serves as the frozen REPA target encoder of the demo
(:func:`simflow.classifier.classifier_patch_tokens`).
"""

from __future__ import annotations

import sys
import urllib.error
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from simflow.classifier import load_classifier, match_input
from simflow.io import atomic_write, check_nhwc_uint8, load_npz_array

__all__ = [
    "CLASSIFIER_EXTRACTOR_NAME",
    "FeatureExtractorWeightsError",
    "INCEPTION_EXTRACTOR_NAME",
    "NpzImages",
    "compute_metrics",
    "compute_reference_statistics",
    "extract_features",
    "frechet_distance",
    "images_to_uint8",
    "inception_weights_cache_path",
    "load_reference_features",
    "load_reference_statistics",
    "register_classifier_extractor",
]

INCEPTION_EXTRACTOR_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
CLASSIFIER_EXTRACTOR_NAME = "simflow-classifier"
#: Most per-image reference features kept for KID (a seeded subset beyond it): KID averages
#: subsets of at most 1000 features (torch-fidelity's default subset size), so 50 000 reference
#: features are ample, and the whole ImageNet train set (1.28M x 2048 floats, 10 GB) is not stored.
KID_REFERENCE_FEATURES = 50_000


class FeatureExtractorWeightsError(FileNotFoundError):
    """The feature extractor's weights are not available (offline and not cached, or a wrong path)."""


# --------------------------------------------------------------------------------------------------
# Conversions and sample datasets
# --------------------------------------------------------------------------------------------------


def images_to_uint8(images: Tensor) -> Tensor:
    """Float images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), DiT's ``clamp(127.5 * x + 128, 0, 255)``.

    The cast truncates toward zero, so -1 -> 0, 0 -> 128 and 1 -> 255; values outside [-1, 1] clip.
    """
    if images.dim() != 4:
        raise ValueError(f"images_to_uint8 expects (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images_to_uint8 expects float images in [-1, 1], got dtype {images.dtype}")
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def _as_rgb(x: Tensor) -> Tensor:
    """A (1 or 3, H, W) image as a contiguous (3, H, W) one: grey is repeated over RGB, as the
    Inception network expects three channels."""
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).contiguous()


class NpzImages(Dataset):
    """Images of an ADM-style npz (or a uint8 NHWC array) as torch-fidelity inputs.

    Items are uint8 tensors (3, H, W): grayscale images are repeated to 3 channels, as torch-fidelity's
    extractors require RGB. ``labels`` holds ``arr_1`` when the file has it, else None.
    """

    def __init__(self, source: str | Path | np.ndarray, key: str = "arr_0") -> None:
        if isinstance(source, np.ndarray):
            self.images = source
            self.labels = None
            self.path = None
        else:
            self.path = Path(source)
            self.images = load_npz_array(self.path, key)
            with zipfile.ZipFile(self.path) as zf:
                has_labels = "arr_1.npy" in zf.namelist()
            self.labels = load_npz_array(self.path, "arr_1") if has_labels and key == "arr_0" else None
        check_nhwc_uint8(self.images, f"images in {self.path or 'array'}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return _as_rgb(torch.from_numpy(np.array(self.images[index], copy=True)).permute(2, 0, 1))


class _FloatDatasetAsUint8(Dataset):
    """Wrap a simflow dataset ((float image in [-1, 1], label) items) as uint8 (3, H, W) items."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        image = self.dataset[index][0]
        return _as_rgb(images_to_uint8(image.unsqueeze(0))[0].permute(2, 0, 1))


class _Uint8GrayToRGB(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return _as_rgb(self.dataset[index])


def as_fidelity_dataset(source: Any) -> Dataset:
    """Turn an npz path, a uint8 NHWC array or a Dataset into a torch-fidelity input (uint8 (3, H, W) items).

    Datasets may yield uint8 (1 or 3, H, W) tensors or simflow's ``(float image in [-1, 1], label)`` pairs.
    """
    if isinstance(source, (str, Path)):
        return NpzImages(source)
    if isinstance(source, np.ndarray):
        return NpzImages(source)
    if isinstance(source, Dataset):
        first = source[0]
        if torch.is_tensor(first) and first.dtype == torch.uint8 and first.dim() == 3:
            if first.shape[0] == 3:
                return source
            if first.shape[0] == 1:
                return _Uint8GrayToRGB(source)
        if isinstance(first, (tuple, list)) and torch.is_tensor(first[0]) and first[0].is_floating_point():
            return _FloatDatasetAsUint8(source)
        raise ValueError(
            "a dataset used for metrics must yield uint8 (C, H, W) tensors or (float image in [-1, 1], label) "
            f"pairs; its first item is {type(first).__name__}"
        )
    raise TypeError(f"expected an npz path, a uint8 NHWC array or a Dataset, got {type(source).__name__}")


# --------------------------------------------------------------------------------------------------
# Fréchet distance (independent implementation, used to check the torch-fidelity path)
# --------------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Uses scipy's matrix square root (the pytorch-fid/TTUR formulation); when the product is singular an
    ``eps`` multiple of the identity is added to both covariances. Computed in float64.
    """
    # lazy: scipy.linalg costs ~0.2 CPU-s; only the Fréchet distance needs it
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if isinstance(covmean, tuple):  # older scipy returned (sqrtm, error) with disp=False
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts come from round-off on near-singular products; large ones mean bad input.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"frechet_distance: imaginary component {np.abs(covmean.imag).max():g} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------
# The demo proxy: the classifier (trained by simflow.classifier) as a torch-fidelity extractor
# --------------------------------------------------------------------------------------------------


_EXTRACTOR_BASE: type | None = None


def _classifier_extractor_base() -> type:
    """Build (once) the torch-fidelity FeatureExtractorBase subclass wrapping a SmallClassifier.

    Defined lazily because importing torch_fidelity costs ~3 s, also in stages that compute no metric.
    """
    global _EXTRACTOR_BASE
    if _EXTRACTOR_BASE is not None:
        return _EXTRACTOR_BASE
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """uint8 (B, 3, H, W) -> ("features" (B, feature_dim), "logits" (B, num_classes)) of a SmallClassifier.

        The checkpoint is the class attribute set at registration, or ``feature_extractor_weights_path``.
        """

        checkpoint_path: str | None = None

        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any) -> None:
            super().__init__(name, features_list)
            path = feature_extractor_weights_path or self.checkpoint_path
            if path is None:
                raise FeatureExtractorWeightsError(f"no classifier checkpoint registered for feature extractor {name!r}")
            self.classifier = load_classifier(path)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
            # Inverse of images_to_uint8 up to quantisation: 0 -> -1, 255 -> 1.
            xf = match_input(x.float() / 127.5 - 1.0, self.classifier.in_channels, self.classifier.image_size)
            feats, logits = self.classifier.forward_features(xf)
            out = {"features": feats, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    _EXTRACTOR_BASE = ClassifierFeatureExtractor
    return _EXTRACTOR_BASE


def register_classifier_extractor(checkpoint_path: str | Path, name: str = CLASSIFIER_EXTRACTOR_NAME) -> str:
    """Register the classifier at ``checkpoint_path`` as torch-fidelity feature extractor ``name``; returns ``name``.

    Registering the same name again points it at the new checkpoint (torch-fidelity forbids replacing a
    registry entry, so the registered class's checkpoint attribute is updated instead). A name taken by
    another extractor (e.g. ``inception-v3-compat``) raises ValueError.
    """
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    base = _classifier_extractor_base()
    path = str(Path(checkpoint_path).resolve())
    load_classifier(path)  # fail now, with a clear message, rather than inside a metric computation
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is not None:
        if not (isinstance(existing, type) and issubclass(existing, base)):
            raise ValueError(f"feature extractor name {name!r} is taken by {existing.__name__}; choose another name")
        existing.checkpoint_path = path
        return name
    cls = type(f"ClassifierFeatureExtractor_{name.replace('-', '_')}", (base,), {"checkpoint_path": path})
    torch_fidelity.register_feature_extractor(name, cls)
    return name


# --------------------------------------------------------------------------------------------------
# Feature extraction through torch-fidelity
# --------------------------------------------------------------------------------------------------


def inception_weights_cache_path() -> Path:
    """Where torch-fidelity looks for (and downloads) the Inception weights: $TORCH_HOME/hub/checkpoints/..."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def _resolve_cuda(cuda: bool | None) -> bool:
    if cuda is None:
        return torch.cuda.is_available()
    if cuda and not torch.cuda.is_available():
        raise ValueError("cuda=True was requested for the metrics but no CUDA device is available; pass cuda=False")
    return bool(cuda)


def _default_verbose() -> bool:
    # torch-fidelity's progress bars and prints go to stderr; keep logs of batch jobs clean.
    return sys.stderr.isatty()


def _extractor_class(name: str) -> type:
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"feature extractor {name!r} is not registered with torch-fidelity (known: "
            f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}); for the demo classifier call "
            f"register_classifier_extractor(checkpoint, name={name!r}) first"
        )
    return FEATURE_EXTRACTORS_REGISTRY[name]


def _create_extractor(name: str, layers: Iterable[str], weights_path: str | Path | None, cuda: bool, verbose: bool):
    """torch-fidelity's ``create_feature_extractor``, with one clear error when weights are unavailable."""
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity.utils import create_feature_extractor

    _extractor_class(name)
    if weights_path is not None and not Path(weights_path).is_file():
        raise FeatureExtractorWeightsError(
            f"feature extractor weights not found at {weights_path} (eval.feature_extractor_weights_path)"
        )
    try:
        return create_feature_extractor(
            name, list(dict.fromkeys(layers)), cuda=cuda, verbose=verbose,
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:  # the download of missing weights failed
        if weights_path is not None:
            raise
        if name == INCEPTION_EXTRACTOR_NAME:
            where = (
                f"Put the file {INCEPTION_WEIGHTS_FILENAME} at {inception_weights_cache_path()} "
                f"(i.e. $TORCH_HOME/hub/checkpoints/{INCEPTION_WEIGHTS_FILENAME}), or set the config key "
                "eval.feature_extractor_weights_path to its location. Fetch it on a machine with internet from "
                "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
            )
        else:
            where = f"Pre-download them into {torch.hub.get_dir()}, or set eval.feature_extractor_weights_path."
        raise FeatureExtractorWeightsError(
            f"could not load the weights of feature extractor {name!r}: the download failed ({err}). {where}"
        ) from err


def extract_features(source: Any, feat_extractor, batch_size: int = 64, cuda: bool = False, verbose: bool = False) -> dict[str, Tensor]:
    """Run a torch-fidelity extractor over ``source`` (see :func:`as_fidelity_dataset`) -> {layer: (N, D) float}."""
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity.utils import get_featuresdict_from_dataset

    dataset = as_fidelity_dataset(source)
    if len(dataset) < 2:
        raise ValueError(f"need at least 2 images for feature statistics, got {len(dataset)}")
    return get_featuresdict_from_dataset(dataset, feat_extractor, batch_size, cuda, save_cpu_ram=True, verbose=verbose)


def _statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.double())
    return np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Reference statistics and metrics
# --------------------------------------------------------------------------------------------------


def _reference_metadata(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as npz:
        meta = {}
        for key in ("feature_extractor", "feature_layer", "num_images"):
            if key in npz.files:
                meta[key] = npz[key].item()
        return meta


def compute_reference_statistics(
    dataset_or_npz: Any,
    out_path: str | Path,
    feature_extractor: str = INCEPTION_EXTRACTOR_NAME,
    feature_extractor_weights_path: str | Path | None = None,
    batch_size: int = 64,
    cuda: bool | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """FID reference statistics of a data set, computed once and cached at ``out_path``.

    ``dataset_or_npz``: an npz of uint8 NHWC images, such an array, or a Dataset (simflow's float pairs or
    uint8 tensors). Writes an npz with ``mu`` (D,), ``sigma`` (D, D) (float64), ``features`` (N, D)
    (float32: the per-image features, from which :func:`compute_metrics` computes KID without
    extracting the reference images again; a seeded subset of :data:`KID_REFERENCE_FEATURES` of them
    for larger reference sets), ``num_images``, ``feature_extractor`` and ``feature_layer``. An existing file made with the same extractor is reused
    unless ``overwrite``; one made with another extractor raises ValueError.
    """
    out_path = Path(out_path)
    cls = _extractor_class(feature_extractor)
    layer = cls.get_default_feature_layer_for_metric("fid")
    if out_path.is_file() and not overwrite:
        meta = _reference_metadata(out_path)
        if meta.get("feature_extractor") == feature_extractor and meta.get("feature_layer") == layer:
            return out_path
        raise ValueError(
            f"{out_path} exists but holds statistics for extractor {meta.get('feature_extractor')!r} "
            f"(layer {meta.get('feature_layer')!r}), not {feature_extractor!r}/{layer!r}; delete it or pass overwrite=True"
        )
    use_cuda = _resolve_cuda(cuda)
    verbose = _default_verbose()
    fe = _create_extractor(feature_extractor, [layer], feature_extractor_weights_path, use_cuda, verbose)
    feats = extract_features(dataset_or_npz, fe, batch_size, use_cuda, verbose)[layer]
    mu, sigma = _statistics(feats)
    kid_feats = feats.float().numpy()
    if len(kid_feats) > KID_REFERENCE_FEATURES:
        keep = np.sort(np.random.default_rng(0).choice(len(kid_feats), KID_REFERENCE_FEATURES, replace=False))
        kid_feats = kid_feats[keep]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=kid_feats, num_images=np.int64(len(feats)),
                     feature_extractor=np.str_(feature_extractor), feature_layer=np.str_(layer))

    return atomic_write(out_path, write)


def load_reference_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as float64 from a file of :func:`compute_reference_statistics` or ADM's
    reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``, whose ``mu``/``sigma`` are Inception pool3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path}. Compute them with compute_reference_statistics, or download "
            "ADM's VIRTUAL_imagenet256_labeled.npz (openai/guided-diffusion evaluations/README.md) for ImageNet 256."
        )
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("mu", "sigma") if k not in npz.files]
        if missing:
            raise KeyError(f"{path} is not a statistics file: missing {missing} (it has {npz.files})")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def load_reference_features(path: str | Path) -> Tensor | None:
    """The per-image reference features (N, D) of a :func:`compute_reference_statistics` file, or
    None when it has none (an older file, or a precomputed batch such as ADM's)."""
    with np.load(Path(path), allow_pickle=False) as npz:
        return torch.from_numpy(npz["features"].astype(np.float32)) if "features" in npz.files else None


def compute_metrics(
    samples_npz: str | Path,
    reference: str | Path,
    reference_images: Any = None,
    feature_extractor: str = INCEPTION_EXTRACTOR_NAME,
    feature_extractor_weights_path: str | Path | None = None,
    isc: bool = True,
    kid: bool = True,
    prc: bool = False,
    cuda: bool | None = None,
    *,
    batch_size: int = 64,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    rng_seed: int = 2020,
) -> dict[str, Any]:
    """FID (and IS, KID, precision/recall) of the samples in ``samples_npz``.

    FID: torch-fidelity's extractor over the samples -> mu/sigma -> torch-fidelity's
    ``fid_statistics_to_metric`` against the reference statistics file ``reference``. IS uses the
    samples alone (torch-fidelity: ``isc_splits`` shuffled splits, mean and std). KID (torch-fidelity's
    unbiased MMD estimate over ``kid_subsets`` subsets of ``min(kid_subset_size, N)`` samples, mean and
    std) compares the samples' features with the reference file's per-image ``features`` when it has
    them, else with those of ``reference_images``; precision/recall need ``reference_images`` (npz
    path, array or Dataset). Without the reference features their keys are absent.
    Precision/recall use the FID feature layer (Inception pool3 as in the ADM evaluator, not VGG16).

    Returns ``{"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall",
    "num_samples", "feature_extractor"}`` (``num_reference_images`` too when reference images are used).
    """
    # lazy: torch_fidelity (and torchvision under it) costs ~2 CPU-s; only the FID stages need it
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    use_cuda = _resolve_cuda(cuda)
    verbose = _default_verbose()
    cls = _extractor_class(feature_extractor)
    reference = Path(reference)
    mu_ref, sigma_ref = load_reference_statistics(reference)
    ref_extractor = _reference_metadata(reference).get("feature_extractor")
    if ref_extractor is not None and ref_extractor != feature_extractor:
        raise ValueError(
            f"{reference} holds statistics of extractor {ref_extractor!r} but metrics were asked with "
            f"{feature_extractor!r}; FID is only meaningful with the same extractor on both sides"
        )
    layer = {m: cls.get_default_feature_layer_for_metric(m) for m in ("isc", "fid", "kid")}
    layer["prc"] = layer["fid"]
    # KID from the reference file's features when it has them (the FID layer is KID's in both extractors).
    ref_kid_feats = load_reference_features(reference) if kid and layer["kid"] == layer["fid"] else None
    need_ref_images = ((kid and ref_kid_feats is None) or prc) and reference_images is not None
    if ((kid and ref_kid_feats is None) or prc) and reference_images is None:
        warnings.warn("compute_metrics: no reference_images given (and no features in the reference file), "
                      "so KID and precision/recall are skipped", stacklevel=2)
    layers = [layer["fid"]] + ([layer["isc"]] if isc else []) + ([layer["kid"]] if kid else [])

    fe = _create_extractor(feature_extractor, layers, feature_extractor_weights_path, use_cuda, verbose)
    feats = extract_features(samples_npz, fe, batch_size, use_cuda, verbose)
    mu, sigma = _statistics(feats[layer["fid"]])
    if mu.shape != mu_ref.shape:
        raise ValueError(
            f"feature dimension mismatch: {feature_extractor!r} gives {mu.size}-d features but {reference} "
            f"holds {mu_ref.size}-d statistics (ADM reference batches need inception-v3-compat)"
        )
    out: dict[str, Any] = {
        "fid": fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": mu_ref, "sigma": sigma_ref}, False)[KEY_METRIC_FID],
        "num_samples": int(len(feats[layer["fid"]])),
        "feature_extractor": feature_extractor,
    }
    if isc:
        m = isc_features_to_metric(feats[layer["isc"]], splits=isc_splits, shuffle=True, rng_seed=rng_seed)
        out["isc_mean"], out["isc_std"] = m[KEY_METRIC_ISC_MEAN], m[KEY_METRIC_ISC_STD]
    ref_feats = extract_features(reference_images, fe, batch_size, use_cuda, verbose) if need_ref_images else {}
    if ref_feats:
        out["num_reference_images"] = int(len(ref_feats[layer["fid"]]))
    if kid and ref_kid_feats is not None:
        ref_feats = {**ref_feats, layer["kid"]: ref_kid_feats}
        out["num_reference_images"] = int(len(ref_kid_feats))
    if ref_feats:
        if kid and layer["kid"] in ref_feats:
            f1, f2 = feats[layer["kid"]], ref_feats[layer["kid"]]
            if f1.shape[1] != f2.shape[1]:
                raise ValueError(f"KID: the samples' features are {f1.shape[1]}-d but the reference's "
                                 f"{f2.shape[1]}-d; the reference file was made with another extractor")
            m = kid_features_to_metric(
                f1, f2, kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, len(f1), len(f2)),
                rng_seed=rng_seed, verbose=False,
            )
            out["kid_mean"], out["kid_std"] = m[KEY_METRIC_KID_MEAN], m[KEY_METRIC_KID_STD]
        if prc and layer["prc"] in ref_feats and need_ref_images:
            m = prc_features_to_metric(
                feats[layer["prc"]], ref_feats[layer["prc"]], prc_neighborhood=prc_neighborhood,
                save_cpu_ram=True, verbose=False,
            )
            out["precision"], out["recall"] = m[KEY_METRIC_PRECISION], m[KEY_METRIC_RECALL]
    return out
