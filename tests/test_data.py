"""Tests of simflow.data: shapes, ranges, labels, the idx parser, the not-found message and the ADM crop."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from simflow import data
from simflow.data import DatasetNotFoundError, build_dataset, center_crop_arr, dataset_info, subset_indices


# ------------------------------------------------------------------------------------------------ helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format (gzipped when the name ends in .gz)."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def tiny_fashion(directory: Path, n_train: int = 5, n_test: int = 3, gz: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny Fashion-MNIST-format set of idx files and return the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # make sure both extremes occur
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian location at an empty folder and forbid downloads, so only data.root is searched."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-here")
    monkeypatch.delenv(data.ALLOW_DOWNLOAD_ENV, raising=False)
    data._load_fashion_arrays.cache_clear()
    return tmp_path / "no-debian-here"


# ------------------------------------------------------------------------------------------------ registry


def test_dataset_info_and_unknown_name():
    assert dataset_info("digits") == data.DatasetInfo(channels=1, num_classes=10, native_size=8)
    assert dataset_info("fashion_mnist") == data.DatasetInfo(channels=1, num_classes=10, native_size=28)
    assert dataset_info("imagefolder").channels == 3
    assert dataset_info("imagefolder").num_classes == 1000
    with pytest.raises(ValueError, match="digits.*fashion_mnist.*imagefolder"):
        build_dataset("cifar10", None, "train", 32)
    with pytest.raises(ValueError, match="known datasets"):
        dataset_info("mnist")


def test_subset_indices_deterministic_unique_sorted():
    a = subset_indices(1000, 50, seed=3)
    assert np.array_equal(a, subset_indices(1000, 50, seed=3))
    assert not np.array_equal(a, subset_indices(1000, 50, seed=4))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    assert np.array_equal(subset_indices(10, 20, seed=0), np.arange(10))
    with pytest.raises(ValueError, match="positive"):
        subset_indices(10, 0, seed=0)


# ------------------------------------------------------------------------------------------------ digits


def test_digits_native_shapes_range_labels():
    train = build_dataset("digits", None, "train", 8)
    test = build_dataset("digits", None, "test", 8)
    assert len(train) + len(test) == 1797
    assert len(test) == 359
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    all_x = train.images
    assert all_x.min().item() == -1.0 and all_x.max().item() == 1.0
    assert set(int(v) for v in train.labels) == set(range(10))
    assert train.num_classes == 10 and train.channels == 1


def test_digits_split_is_deterministic_and_matches_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    test = build_dataset("digits", None, "val", 8)  # 'val' is an alias of 'test'
    x, y = test[0]
    # The test split is the tail of sklearn's fixed order, mapped with x / 8 - 1.
    np.testing.assert_allclose(x[0].numpy(), bunch.images[1797 - 359] / 8.0 - 1.0, atol=1e-6)
    assert y == int(bunch.target[1797 - 359])
    again = build_dataset("digits", None, "test", 8)
    assert torch.equal(test.images, again.images)


def test_digits_resized_to_32():
    ds = build_dataset("digits", None, "train", 32)
    x, _ = ds[5]
    assert x.shape == (1, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    # Bilinear upsampling preserves the mean brightness to within a few percent.
    small = build_dataset("digits", None, "train", 8)[5][0]
    assert abs(x.mean().item() - small.mean().item()) < 0.05


def test_bad_split_and_size():
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", None, "validation-set", 8)
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("digits", None, "train", 0)


def test_hflip_flips_some_items():
    torch.manual_seed(0)
    plain = build_dataset("digits", None, "train", 8)
    flipped = build_dataset("digits", None, "train", 8, hflip=True)
    flips = sum(torch.equal(flipped[i][0], plain[i][0].flip(-1)) and not torch.equal(plain[i][0], plain[i][0].flip(-1)) for i in range(40))
    assert 5 < flips < 35


# ------------------------------------------------------------------------------------------------ idx / fashion_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, no_debian, gz):
    arrays = tiny_fashion(tmp_path / "fm", gz=gz)
    train = build_dataset("fashion_mnist", str(tmp_path / "fm"), "train", 32)
    test = build_dataset("fashion_mnist", str(tmp_path / "fm"), "test", 32)
    assert len(train) == 5 and len(test) == 3
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # The 28x28 interior is the pixels mapped by x / 127.5 - 1; the 2-pixel border is background (-1).
    np.testing.assert_allclose(x[0, 2:30, 2:30].numpy(), arrays["train_images"][0] / 127.5 - 1.0, atol=1e-6)
    assert x[0, 2, 2].item() == -1.0 and x[0, 2, 3].item() == 1.0  # pixels 0 and 255
    border = torch.cat([x[0, :2].flatten(), x[0, 30:].flatten(), x[0, :, :2].flatten(), x[0, :, 30:].flatten()])
    assert torch.all(border == -1.0)
    assert [test[i][1] for i in range(3)] == arrays["t10k_labels"].tolist()


def test_fashion_mnist_other_size_and_torchvision_layout(tmp_path, no_debian):
    tiny_fashion(tmp_path / "root" / "FashionMNIST" / "raw")
    ds = build_dataset("fashion_mnist", str(tmp_path / "root"), "train", 16)
    x, _ = ds[1]
    assert x.shape == (1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert ds.source == tmp_path / "root" / "FashionMNIST" / "raw"


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="10 bytes"):
        data.read_idx(short)


def test_fashion_mnist_missing_lists_paths(tmp_path, no_debian):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("fashion_mnist", str(root), "train", 32)
    msg = str(info.value)
    for expected in (str(root), str(root / "FashionMNIST" / "raw"), str(no_debian),
                     "apt-get install dataset-fashion-mnist", "data.root", "train-images-idx3-ubyte"):
        assert expected in msg
    assert isinstance(info.value, FileNotFoundError)


def test_fashion_mnist_download_only_when_allowed(tmp_path, no_debian, monkeypatch):
    calls = []

    def fake_download(root: Path, train: bool) -> None:  # stands in for torchvision's download
        calls.append((root, train))
        tiny_fashion(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "_download_fashion_mnist", fake_download)
    with pytest.raises(DatasetNotFoundError, match="downloading is off"):
        build_dataset("fashion_mnist", str(tmp_path / "dl"), "train", 32)
    assert calls == []
    monkeypatch.setenv(data.ALLOW_DOWNLOAD_ENV, "1")
    ds = build_dataset("fashion_mnist", str(tmp_path / "dl"), "train", 32)
    assert calls == [(tmp_path / "dl", True)] and len(ds) == 5


@pytest.mark.skipif(not (data.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_debian_package():
    train = build_dataset("fashion_mnist", None, "train", 32)
    test = build_dataset("fashion_mnist", None, "test", 32)
    assert len(train) == 60000 and len(test) == 10000
    assert train.source == data.DEBIAN_FASHION_MNIST_DIR
    x, y = train[123]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1 and 0 <= y < 10
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))  # Fashion-MNIST test is balanced


# ------------------------------------------------------------------------------------------------ imagefolder


def _striped_image(width: int, height: int):
    """RGB image: left third red, middle third green, right third blue."""
    from PIL import Image

    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 3, 0] = 255
    arr[:, width // 3 : 2 * width // 3, 1] = 255
    arr[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(arr)


def test_center_crop_arr_sizes_and_content():
    out = center_crop_arr(_striped_image(300, 100), 32)
    assert out.size == (32, 32)
    arr = np.asarray(out).astype(int)
    # A 3:1 wide image keeps only its middle (green) third after the centre crop.
    assert arr[:, 2:-2, 1].min() > 200 and arr[:, 2:-2, 0].max() < 60 and arr[:, 2:-2, 2].max() < 60
    tall = center_crop_arr(_striped_image(40, 90), 16)
    assert tall.size == (16, 16)


def test_imagefolder_tiny(tmp_path):
    from PIL import Image

    for cls, size in (("n01", (120, 40)), ("n02", (50, 70))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        _striped_image(*size).save(tmp_path / "train" / cls / "a.png")
    Image.fromarray(np.full((30, 30), 200, dtype=np.uint8)).save(tmp_path / "train" / "n02" / "gray.png")
    ds = build_dataset("imagefolder", str(tmp_path), "train", 16)
    assert len(ds) == 3 and ds.num_classes == 2 and ds.channels == 3
    labels = [ds[i][1] for i in range(3)]
    assert labels == [0, 1, 1]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[1, :, 3:-3].mean() > 0.8 and x[0, :, 3:-3].mean() < -0.6  # centre crop of a wide image: green
    gray = next(ds[i][0] for i in range(3) if ds.samples[i][0].endswith("gray.png"))
    assert gray.shape == (3, 16, 16) and torch.allclose(gray, torch.full_like(gray, 200 / 127.5 - 1), atol=1e-5)


def test_imagefolder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        build_dataset("imagefolder", None, "train", 16)
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("imagefolder", str(tmp_path), "val", 16)
    assert str(tmp_path / "val") in str(info.value) and "train" in str(info.value)


def test_imagefolder_held_out_split_is_imagenets_val_folder(tmp_path):
    """The evaluation stages ask for split 'test'; ImageNet's labelled held-out set is val/."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 10 * i, dtype=np.uint8)).save(tmp_path / "val" / "n01" / f"{i}.png")
    for split in ("test", "val"):
        ds = build_dataset("imagefolder", str(tmp_path), split, 16)
        assert len(ds) == 2 and all(path.startswith(str(tmp_path / "val")) for path, _ in ds.samples)
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        build_dataset("imagefolder", str(tmp_path), "holdout", 16)


def test_stage_start_up_imports_neither_sklearn_nor_sympy():
    """Start-up cost (docs/performance.md): the digits come from sklearn's csv without importing
    sklearn (~1 CPU-s), and the VAE posterior checks its shapes without torch.broadcast_shapes,
    which imports sympy (~0.3 CPU-s)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from simflow.data import build_dataset\n"
        "from simflow.vae import DiagonalGaussian\n"
        "ds = build_dataset('digits', None, 'train', 8)\n"
        "DiagonalGaussian(torch.zeros(2, 3), torch.ones(1, 3))\n"
        "print(len(ds), sorted(m for m in ('sklearn', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1438", "[]"]
