"""Writing files so that a failure leaves nothing half-written behind.

:func:`atomic_write` is the one writer of the package's final files (checkpoints, configs,
metrics, samples; :func:`write_text`, :func:`write_json`, :func:`save_npz` and :func:`write_png`
write the common formats through it): the data go to a hidden temporary file next to the
target, which is checked (optionally) and then renamed over the target, so a reader sees
either the old file or the complete new one. On any failure the temporary file is removed and
the old file stays as it was; a full disk becomes one :class:`DiskFullError` that says so and
names the file::

    atomic_write(run_dir / "model.pt", lambda tmp: torch.save(state, tmp))

Full disks do not always say so: ``torch.save`` reports a short write as ``RuntimeError: [enforce
fail at inline_container.cc] . unexpected pos``. So a failed write is also taken as a full disk
when (before its temporary file is removed) the filesystem has less than
:data:`LOW_SPACE_BYTES` left.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DiskFullError", "LOW_SPACE_BYTES", "atomic_write", "check_nhwc_uint8", "disk_full_cause",
           "load_npz_array", "make_grid", "save_npz", "save_samples_npz", "temp_path", "write_json",
           "write_png", "write_text"]

#: A write that fails while less than this is free on its filesystem failed for lack of space.
LOW_SPACE_BYTES = 1 << 20

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full")
_counter = itertools.count()


class DiskFullError(OSError):
    """No space was left while writing ``filename``; the message says where and what to do."""

    def __init__(self, message: str, filename: str | Path) -> None:
        super().__init__(errno.ENOSPC, message, str(filename))
        self.message = message

    def __str__(self) -> str:
        return self.message


def temp_path(path: Path) -> Path:
    """The hidden temporary file that :func:`atomic_write` fills before renaming it to ``path``:
    same folder (so the rename is atomic), unique per process and call, the target's suffix
    kept last (``np.savez`` appends ``.npz`` otherwise; PIL picks the format from it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{next(_counter)}{path.suffix}")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_cause(err: BaseException) -> BaseException | None:
    """The exception in ``err``'s chain (``err`` itself, its cause or context) that reports a full
    disk or quota (ENOSPC, EDQUOT, or SQLite's "database or disk is full"), else None."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, DiskFullError):
            return node
        if isinstance(node, OSError) and node.errno in _FULL_ERRNOS:
            return node
        if any(text in str(node).lower() for text in _FULL_TEXTS):
            return node
        node = node.__cause__ or node.__context__
    return None


def _disk_full_error(path: Path, err: BaseException) -> DiskFullError:
    where = _mount_point(path.parent)
    return DiskFullError(
        f"no space left on {where} while writing {path}: free some space there (or point "
        f"the output elsewhere) and rerun; {path.name} was not replaced and no temporary file "
        f"was left behind ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        path)


def atomic_write(path: str | Path, writer: Callable[[Path], object], *,
                 verify: Callable[[Path], None] | None = None,
                 commit: Callable[[Path, Path], None] | None = None) -> Path:
    """Write ``path`` through a temporary file: ``writer(tmp)`` fills it, ``verify(tmp)`` (if
    given) raises if what was written cannot be read back, then ``commit(tmp, path)`` (default
    ``os.replace``) puts it in place. Returns ``path``.

    Whatever fails, the temporary file is removed and ``path`` is left as it was; a failure for
    lack of space is re-raised as :class:`DiskFullError` (an ``OSError`` with errno ENOSPC).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if disk_full_cause(err) is not None:
            raise _disk_full_error(path, err) from err
        raise
    tmp = temp_path(path)
    try:
        writer(tmp)
        if verify is not None:
            verify(tmp)
        (commit or os.replace)(tmp, path)
    except BaseException as err:
        # Decide before removing the temporary file: removing it frees the space it took.
        full = False
        if isinstance(err, Exception) and not isinstance(err, DiskFullError):
            free = _free_bytes(path.parent)
            full = disk_full_cause(err) is not None or (free is not None and free < LOW_SPACE_BYTES)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if full:
            raise _disk_full_error(path, err) from err
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON with sorted keys (numpy scalars as floats), atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def save_npz(path: str | Path, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)``, atomically."""
    import numpy as np  # not at module level: the submit host's imports stay light

    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def check_nhwc_uint8(array: np.ndarray, what: str) -> None:
    """Raise ValueError unless ``array`` is uint8 NHWC with 1 or 3 channels (the ADM npz format)."""
    import numpy as np  # not at module level: the submit host's imports stay light

    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"{what} must be uint8 NHWC with 1 or 3 channels (the ADM npz format), "
            f"got dtype {array.dtype} and shape {array.shape}"
        )


def save_samples_npz(path: str | Path, uint8_nhwc: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write samples as an uncompressed ``.npz`` with ``arr_0`` = uint8 NHWC images and ``arr_1`` = labels.

    This is the layout written by guided-diffusion's sampling scripts and read by the ADM evaluator.
    The file is uncompressed, so :func:`load_npz_array` can memory-map it; it is written atomically.
    """
    import numpy as np  # not at module level: the submit host's imports stay light

    path = Path(path)
    images = np.asarray(uint8_nhwc)
    check_nhwc_uint8(images, "samples")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _npz_member_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map member ``key`` of an uncompressed npz (None when it is compressed or absent).

    50k ImageNet samples are ~10 GB, so reading them lazily matters. An uncompressed zip member is
    stored contiguously after its local header, so the .npy payload can be mapped in place.
    """
    import numpy as np  # not at module level: the submit host's imports stay light

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def load_npz_array(path: str | Path, key: str = "arr_0") -> np.ndarray:
    """Array ``key`` of an npz: memory-mapped when stored uncompressed, else read into memory."""
    import numpy as np  # not at module level: the submit host's imports stay light

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    mapped = _npz_member_memmap(path, key)
    if mapped is not None:
        return mapped
    with np.load(path) as npz:
        if key not in npz.files:
            raise KeyError(f"{path} has no array {key!r} (it has {npz.files})")
        return npz[key]


def write_png(path: str | Path, image: Any) -> Path:
    """Write an HWC uint8 array (1 or 3 channels) as a PNG, atomically."""
    from PIL import Image  # not at module level: the submit host's imports stay light

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def make_grid(images: Any, ncol: int | None = None) -> Any:
    """uint8 (N, H, W, C) → one uint8 image (rows·H, ncol·W, C), row by row."""
    import numpy as np  # not at module level: the submit host's imports stay light

    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / ncol))
    grid = np.zeros((rows * h, ncol * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return grid
