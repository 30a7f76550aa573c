"""Datasets for SimFlow: ``digits`` (unit tests), ``fashion_mnist`` (the demo) and ``imagefolder`` (ImageNet).

Every dataset returns ``(image, label)``: ``image`` is a float32 tensor ``(C, H, W)`` with values in
``[-1, 1]`` and ``label`` a Python ``int``. Nothing is downloaded unless the user opts in
(``SIMFLOW_ALLOW_DOWNLOAD=1`` for Fashion-MNIST); a missing dataset raises
:class:`DatasetNotFoundError`, whose message lists every path tried and how to get the data.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from simflow.contracts import SKIPPED_FILES

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "KNOWN_DATASETS",
    "UnreadableFileError",
    "build_dataset",
    "center_crop_arr",
    "dataset_info",
    "read_idx",
    "read_skipped_files",
    "scan_image_files",
    "skipped_files_log",
    "subset_indices",
]

# Where Debian's `dataset-fashion-mnist` package puts the gzipped idx files. A module constant so that
# tests can point it elsewhere to exercise the not-found path on a machine that has the package.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ALLOW_DOWNLOAD_ENV = "SIMFLOW_ALLOW_DOWNLOAD"

# Fraction of sklearn's digits kept as the deterministic test split (the last 20% of the array).
DIGITS_TEST_FRACTION = 0.2


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files were not found; the message lists every path tried and how to get the data."""


class UnreadableFileError(ValueError):
    """A file of the dataset cannot be read or decoded (a truncated JPEG, say); names the file and
    the fix (replace it, or ``data.on_bad_file=skip``)."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception is raised again in the training process as
        # type(err)("Caught ... in DataLoader worker process N.\nOriginal Traceback ...\n
        # simflow.data.UnreadableFileError: <message>"): keep <message>, so that the CLI's one
        # error line names the file whatever data.num_workers is.
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def skipped_files_log(run_dir: str | Path, split: str) -> Path:
    """The file listing the dataset files of ``split`` that ``data.on_bad_file=skip`` left out in
    ``run_dir`` (:data:`simflow.contracts.SKIPPED_FILES`)."""
    return Path(run_dir) / SKIPPED_FILES.format(split=split)


def read_skipped_files(log: str | Path) -> list[str]:
    """The distinct paths in a :func:`skipped_files_log` (every process appends its own; a
    resumed run appends to the earlier runs'), in the order first met; [] without the file."""
    path = Path(log)
    if not path.is_file():
        return []
    return list(dict.fromkeys(line.split("\t", 1)[0] for line in path.read_text().splitlines() if line))


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset.

    channels: image channels (1 = grayscale, 3 = RGB).
    num_classes: number of class labels (labels are ``0 .. num_classes - 1``).
    native_size: side in pixels of the stored images (8 for digits, 28 for Fashion-MNIST). ImageNet
        images vary in size; 256 is given, the resolution of the ADM/DiT/SimFlow benchmark.
    """

    channels: int
    num_classes: int
    native_size: int


_INFO = {
    "digits": DatasetInfo(channels=1, num_classes=10, native_size=8),
    "fashion_mnist": DatasetInfo(channels=1, num_classes=10, native_size=28),
    "imagefolder": DatasetInfo(channels=3, num_classes=1000, native_size=256),
}
KNOWN_DATASETS: tuple[str, ...] = tuple(_INFO)


def _check_name(name: str) -> None:
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def dataset_info(name: str) -> DatasetInfo:
    """Channels, classes and native size of the dataset called ``name`` (see :data:`KNOWN_DATASETS`)."""
    _check_name(name)
    return _INFO[name]


def subset_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct indices of ``range(n_total)``, drawn with ``seed`` and sorted (all of them if n >= n_total).

    Used for evaluation subsets (e.g. reference images for KID/precision/recall), so that the same seed
    always picks the same images.
    """
    if n_total <= 0:
        raise ValueError(f"n_total must be positive, got {n_total}")
    if n <= 0:
        raise ValueError(f"subset size n must be positive, got {n}")
    if n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def _resize(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) or (B, C, H, W) float tensor to a square ``image_size``.

    Antialiasing is used when shrinking, so that downsampling does not alias.
    """
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    shrinking = image_size < max(x.shape[-2:])
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrinking)
    x = x.clamp(-1.0, 1.0)  # bilinear cannot overshoot, but antialias kernels can by a hair
    return x if batched else x.squeeze(0)


def _check_split(split: str, name: str) -> bool:
    """True for the training split; ``val`` is an alias of ``test`` for the two small datasets."""
    if split == "train":
        return True
    if split in ("test", "val"):
        return False
    raise ValueError(f"dataset {name!r}: unknown split {split!r}; use 'train' or 'test' ('val' = 'test')")


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


class _HFlip:
    """Random horizontal flip of a (C, H, W) tensor with probability 1/2 (training augmentation)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            return image.flip(-1)
        return image


# --------------------------------------------------------------------------------------------------
# digits (sklearn)
# --------------------------------------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as float32 images (1797, 8, 8) with values 0..16 and int64 labels.

    Read straight from the csv that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``,
    64 pixel columns and the label), which is what ``sklearn.datasets.load_digits`` does: importing
    sklearn.datasets costs about 1 CPU second per stage process, reading the file 20 ms. Falls back
    to ``load_digits`` if the file is not where this version of scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    # lazy: sklearn.datasets costs ~1.5 CPU-s; only the fallback when the csv is missing needs it
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16), as (1, S, S) float32 images in [-1, 1].

    Split: the first 80% of sklearn's fixed order is ``train`` (1438 images), the last 20% ``test`` (359).
    Images are mapped with ``x / 8 - 1`` (0 -> -1, 16 -> 1) and resized bilinearly to ``image_size``
    once at construction (the whole set is 1797 images, so keeping it as floats is cheap).
    """

    num_classes = 10
    channels = 1

    def __init__(self, split: str, image_size: int, hflip: bool = False) -> None:
        train = _check_split(split, "digits")
        _check_size(image_size)
        images, labels = _load_digits()
        n_test = int(round(DIGITS_TEST_FRACTION * len(images)))
        sl = slice(0, len(images) - n_test) if train else slice(len(images) - n_test, None)
        x = torch.from_numpy(images[sl]).unsqueeze(1) / 8.0 - 1.0
        if image_size != 8:
            x = _resize(x, image_size)
        self.images = x.contiguous()
        self.labels = labels[sl]
        self.transform = _HFlip() if hflip else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)
# --------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped (``.gz``) or plain, into a numpy array.

    Format: 2 zero bytes, a dtype code byte, a byte with the number of dimensions, one big-endian
    uint32 per dimension, then the data. Raises ValueError on a malformed file.
    """
    path = Path(path)
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path | None:
    """The plain or gzipped idx file ``stem`` in ``directory``, or None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_stems(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _fashion_candidate_dirs(root: str | Path | None) -> list[Path]:
    """Where the idx files are looked for: an explicit ``root`` (and torchvision's layout below
    it) and nothing else, so a root without the data is an error, never silently replaced by
    another copy; without a root, Debian's package."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "FashionMNIST" / "raw"]
    return [DEBIAN_FASHION_MNIST_DIR]


def _find_fashion_files(dirs: list[Path], train: bool) -> tuple[Path, Path] | None:
    img_stem, lbl_stem = _fashion_stems(train)
    for d in dirs:
        images, labels = _idx_file(d, img_stem), _idx_file(d, lbl_stem)
        if images is not None and labels is not None:
            return images, labels
    return None


@lru_cache(maxsize=4)
def _load_fashion_arrays(images_path: Path, labels_path: Path, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    # Cached per file (and modification time), so building train and eval datasets reads each file once.
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    return images, labels.astype(np.int64)


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST (60k train, 10k test, 28x28 grayscale, 10 classes) as (1, S, S) float32 in [-1, 1].

    Pixels map with ``x / 127.5 - 1``. The 28x28 images are zero-padded by 2 pixels on each side with the
    background value -1 to 32x32; any other ``image_size`` is reached by a bilinear resize of that 32x32
    image. The arrays stay in memory as uint8 and are converted per item.
    """

    num_classes = 10
    channels = 1

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, source: Path, hflip: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.source = source
        self.transform = _HFlip() if hflip else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[index].astype(np.float32)).unsqueeze(0) / 127.5 - 1.0
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32 with background
        if self.image_size != 32:
            x = _resize(x, self.image_size)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])


def _download_fashion_mnist(root: Path, train: bool) -> None:
    # lazy: torchvision costs ~2 CPU-s; only the Fashion-MNIST download needs it
    import torchvision

    # torchvision writes root/FashionMNIST/raw/*-ubyte(.gz); the search below then finds them there.
    torchvision.datasets.FashionMNIST(str(root), train=train, download=True)


def _build_fashion_mnist(root: str | None, split: str, image_size: int, hflip: bool) -> FashionMNISTDataset:
    train = _check_split(split, "fashion_mnist")
    _check_size(image_size)
    dirs = _fashion_candidate_dirs(root)
    found = _find_fashion_files(dirs, train)
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV, "0") == "1"
    if found is None and allow_download and root is not None:
        _download_fashion_mnist(Path(root).expanduser(), train)
        found = _find_fashion_files(dirs, train)
    if found is None:
        img_stem, lbl_stem = _fashion_stems(train)
        tried = "\n".join(f"  - {d}" for d in dirs)
        if allow_download and root is None:
            download_note = f"{ALLOW_DOWNLOAD_ENV}=1 is set, but no data.root was given to download into."
        elif allow_download:
            download_note = f"the torchvision download into {root} did not produce the files."
        else:
            download_note = f"downloading is off (set {ALLOW_DOWNLOAD_ENV}=1 and data.root to let torchvision download it)."
        if root is not None:
            debian = _find_fashion_files([DEBIAN_FASHION_MNIST_DIR], train) is not None
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} split not found in data.root={root}: need {img_stem}[.gz] and "
                f"{lbl_stem}[.gz] in one of:\n{tried}\nAn explicit data.root is used as given, never "
                f"replaced by another copy: point data.root at the folder holding the idx files, or "
                f"unset it (data.root=null) to use Debian's copy in {DEBIAN_FASHION_MNIST_DIR} "
                f"({'installed' if debian else 'not installed: apt-get install dataset-fashion-mnist'}); "
                f"{download_note}"
            )
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} split not found: need {img_stem}[.gz] and {lbl_stem}[.gz] in one of:\n{tried}\n"
            f"Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs into "
            f"{DEBIAN_FASHION_MNIST_DIR}), or set data.root to a folder holding the idx files; {download_note}"
        )
    images_path, labels_path = found
    images, labels = _load_fashion_arrays(images_path, labels_path, images_path.stat().st_mtime)
    return FashionMNISTDataset(images, labels, image_size, source=images_path.parent, hflip=hflip)


# --------------------------------------------------------------------------------------------------
# ImageFolder (ImageNet)
# --------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image, image_size: int):
    """ADM's centre crop (guided-diffusion ``image_datasets.center_crop_arr``), returned as a PIL image.

    Halve the image with BOX filtering while its short side is >= 2 * image_size (cheap, alias-free
    downsampling), then BICUBIC-resize so the short side equals image_size, then crop the centre square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


class _ADMTransform:
    """PIL RGB image -> ADM centre crop -> float32 (3, S, S) in [-1, 1] (a class so DataLoader workers can pickle it)."""

    def __init__(self, image_size: int, hflip: bool) -> None:
        self.image_size = image_size
        self.flip = _HFlip() if hflip else None

    def __call__(self, pil_image) -> torch.Tensor:
        arr = np.asarray(center_crop_arr(pil_image.convert("RGB"), self.image_size), dtype=np.float32)
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0
        return self.flip(x) if self.flip is not None else x


#: What PIL raises for a file it cannot read or decode: OSError (truncated, "cannot identify
#: image file", I/O errors of the file system), SyntaxError and ValueError (malformed headers).
_UNREADABLE = (OSError, SyntaxError, ValueError)


def _load_rgb(path: str):
    """The image at ``path`` decoded completely, as RGB (what torchvision's ``pil_loader`` does)."""
    with open(path, "rb") as fh:
        image = Image.open(fh)
        return image.convert("RGB")


class CheckedImageFolder(Dataset):
    """An ImageNet-layout folder (torchvision's ``ImageFolder`` listing) whose unreadable files are
    named: ``on_bad_file="error"`` raises :class:`UnreadableFileError` with the path;
    ``"skip"`` leaves the file out, printing its path once per process and appending it to
    ``skip_log`` (:func:`skipped_files_log`), and gives its place to the next readable file in
    the folder order, so batches keep their size and the data order stays a function of
    (seed, step) (a resumed run sees the same batches).

    Exposes ImageFolder's ``samples`` and ``classes``, and ``num_classes``/``channels``."""

    def __init__(self, folder: Path, image_size: int, hflip: bool, on_bad_file: str = "error",
                 skip_log: str | Path | None = None) -> None:
        # lazy: torchvision costs ~2 CPU-s; only image-folder data sets need it
        import torchvision

        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"data.on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        listing = torchvision.datasets.ImageFolder(str(folder))
        self.samples: list[tuple[str, int]] = listing.samples
        self.classes: list[str] = listing.classes
        self.num_classes = len(self.classes)
        self.channels = 3
        self.transform = _ADMTransform(image_size, hflip)
        self.on_bad_file = on_bad_file
        self.skip_log = None if skip_log is None else str(skip_log)
        self.skipped: set[str] = set()  # the files this process skipped

    def __len__(self) -> int:
        return len(self.samples)

    def _skip(self, path: str, err: Exception) -> None:
        if path in self.skipped:
            return
        self.skipped.add(path)
        reason = f"{type(err).__name__}: {err}".replace("\t", " ").replace("\n", " ")
        print(f"data.on_bad_file=skip: skipping unreadable {path} ({reason})", file=sys.stderr, flush=True)
        if self.skip_log is not None:
            Path(self.skip_log).parent.mkdir(parents=True, exist_ok=True)
            with open(self.skip_log, "a") as fh:  # one short append: whole lines across processes
                fh.write(f"{path}\t{reason}\n")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            try:
                return self.transform(_load_rgb(path)), label
            except _UNREADABLE as err:
                if self.on_bad_file == "error":
                    raise UnreadableFileError(
                        f"unreadable image file {path} ({type(err).__name__}: {err}): replace or remove "
                        "it, or set data.on_bad_file=skip to leave unreadable files out (each is "
                        "logged and counted)") from None
                self._skip(path, err)
        raise UnreadableFileError(f"no file of the dataset ({n} files) is readable (data.on_bad_file=skip "
                                  f"skipped them all; the first is {self.samples[index % n][0]})")


def scan_image_files(dataset: CheckedImageFolder, workers: int = 1) -> list[tuple[str, str]]:
    """(path, reason) of every file of ``dataset`` that cannot be decoded, in folder order; the
    preflight's check. JPEGs are decoded in PIL's draft mode (DCT scaling to about the training
    size: the whole compressed stream is still read, so a truncated file still fails) on
    ``workers`` threads (PIL releases the GIL while decoding)."""
    size = dataset.transform.image_size

    def check(path: str) -> str | None:
        try:
            with open(path, "rb") as fh:
                image = Image.open(fh)
                if image.format == "JPEG":
                    image.draft("RGB", (size, size))
                image.load()
        except _UNREADABLE as err:
            return f"{type(err).__name__}: {err}"
        return None

    paths = [p for p, _ in dataset.samples]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(check, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _build_imagefolder(root: str | None, split: str, image_size: int, hflip: bool,
                       on_bad_file: str = "error", skip_log: str | Path | None = None) -> Dataset:
    """ImageNet-layout folders: ``train`` reads ``root/train/``; the held-out split (``test``,
    which the evaluation stages ask for, or its alias ``val``) reads ``root/val/``, because
    ImageNet's labelled held-out images are its validation set (it publishes no test labels)."""
    _check_size(image_size)
    split = "train" if _check_split(split, "imagefolder") else "val"
    if root is None:
        raise DatasetNotFoundError(
            "imagefolder needs data.root: a folder with one sub-folder per split (e.g. train/, val/), "
            "each holding one folder of images per class (the ImageNet layout)."
        )
    folder = Path(root).expanduser() / split
    if not folder.is_dir():
        present = sorted(p.name for p in Path(root).expanduser().iterdir() if p.is_dir()) if Path(root).expanduser().is_dir() else []
        raise DatasetNotFoundError(
            f"imagefolder split {split!r} not found: tried {folder} (data.root={root}; "
            f"split folders present: {present or 'none'}). Set data.root to the ImageNet folder that holds {split}/."
        )
    return CheckedImageFolder(folder, image_size, hflip, on_bad_file, skip_log)


# --------------------------------------------------------------------------------------------------


def build_dataset(name: str, root: str | None, split: str, image_size: int, *, hflip: bool = False,
                  on_bad_file: str = "error", skip_log: str | Path | None = None) -> Dataset:
    """Build the dataset ``name`` (one of :data:`KNOWN_DATASETS`) for ``split`` at ``image_size``.

    Items are ``(image, label)``: float32 ``(C, image_size, image_size)`` in [-1, 1] and an int.
    ``root`` is the data folder (required for ``imagefolder``; optional for ``fashion_mnist``; ignored
    for ``digits``). ``hflip`` turns on random horizontal flips (training augmentation, off by default).
    The returned dataset has ``num_classes`` and ``channels`` attributes.

    ``on_bad_file`` (``data.on_bad_file``) and ``skip_log`` apply to ``imagefolder``, whose files
    are decoded one by one (:class:`CheckedImageFolder`); digits and Fashion-MNIST are read whole
    when the dataset is built, where a malformed file is an error naming it.
    """
    _check_name(name)
    if name == "digits":
        return DigitsDataset(split, image_size, hflip=hflip)
    if name == "fashion_mnist":
        return _build_fashion_mnist(root, split, image_size, hflip)
    return _build_imagefolder(root, split, image_size, hflip, on_bad_file, skip_log)
