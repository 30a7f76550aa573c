"""Helpers for tests that need a torch-fidelity feature extractor without Inception weights.

``write_random_classifier`` writes an untrained :class:`simflow.classifier.SmallClassifier` checkpoint (instant),
enough to exercise the metric code path; ``digits_uint8`` gives sklearn digits in the ADM npz layout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from simflow.data import build_dataset
from simflow.classifier import SmallClassifier, save_classifier
from simflow.fid import images_to_uint8


def write_random_classifier(path: Path, in_channels: int = 1, image_size: int = 16, width: int = 8,
                            feature_dim: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised SmallClassifier checkpoint (seeded) at ``path``."""
    torch.manual_seed(seed)
    return save_classifier(SmallClassifier(in_channels, 10, width, feature_dim, image_size), path)


def digits_uint8(split: str, image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits of ``split`` as (uint8 NHWC images, int labels), converted with DiT's formula."""
    ds = build_dataset("digits", None, split, image_size)
    return images_to_uint8(ds.images).numpy(), np.asarray(ds.labels)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (tiny CNNs run fastest on one thread, and on a busy
    2-core machine two threads can be many times slower than one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
