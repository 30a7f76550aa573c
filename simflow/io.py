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
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "LOW_SPACE_BYTES", "atomic_write", "disk_full_cause", "save_npz", "temp_path",
           "write_json", "write_png", "write_text"]

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


def write_png(path: str | Path, image: Any) -> Path:
    """Write an HWC uint8 array (1 or 3 channels) as a PNG, atomically."""
    from PIL import Image

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
