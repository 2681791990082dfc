"""The files of a cache store: where an image's chunk lives, the commit flags read straight from their
files, and the bytes a store (or one array) takes on disk or in an object store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from mfdetr.cache.location import RemotePath, is_remote, store_location


def chunk_path(root_dir: str | Path | RemotePath, arr: zarr.Array, index: int) -> Path | RemotePath:
    """File (or object) holding image ``index``'s chunk (or shard) of ``arr`` (one image per file along N)."""
    key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
    return store_location(root_dir) / arr.path / key


def read_commit_flags(root_dir: str | Path, arr: zarr.Array) -> np.ndarray:
    """All commit flags [N] uint8 (0 pending, 1 done, 2 skipped).

    Fast path (~4x faster than one zarr read per chunk; seconds for COCO train): the commit array is
    stored uncompressed with one 1-byte chunk per image under ``commit/c/<i>`` (schema v1), so the flags
    are the contents of the chunk files present; missing files are pending, a file of another length
    reads as 255 (damaged: neither pending, done nor skipped). Leftover ``*.partial``
    temporaries of killed writers are ignored (zarr renames a chunk file into place only when complete).
    Falls back to zarr for any other layout.
    """
    enc = arr.metadata.chunk_key_encoding
    if (
        arr.compressors
        or arr.ndim != 1
        or arr.chunks != (1,)
        or enc.to_dict() != {"name": "default", "configuration": {"separator": "/"}}
    ):
        return np.asarray(arr[:], dtype=np.uint8)
    flags = np.zeros(arr.shape[0], dtype=np.uint8)
    if is_remote(root_dir):
        return _remote_commit_flags(store_location(root_dir) / arr.path / "c", flags)  # type: ignore[arg-type]
    base = Path(root_dir) / arr.path / "c"
    if not base.is_dir():
        return flags
    for entry in os.scandir(base):
        if entry.name.isdigit() and int(entry.name) < len(flags):
            with open(entry.path, "rb") as f:
                raw = f.read(2)
            flags[int(entry.name)] = raw[0] if len(raw) == 1 else 255
    return flags


def _remote_commit_flags(base: RemotePath, flags: np.ndarray) -> np.ndarray:
    """:func:`read_commit_flags` on object storage: one listing, then the present flags in one batch."""
    names = [n for n in base.listdir() if n.isdigit() and int(n) < len(flags)]
    if not names:
        return flags
    got = base.fs.cat([f"{base.path}/{n}" for n in names], on_error="return")
    for n in names:
        raw = got.get(f"{base.path}/{n}")
        if isinstance(raw, BaseException):
            if isinstance(raw, FileNotFoundError):
                continue
            raise raw
        flags[int(n)] = raw[0] if len(raw) == 1 else 255
    return flags


def stored_bytes(root_dir: str | Path | RemotePath, name: str | None = None) -> int:
    """Bytes on disk (or in the object store) under the store (or under one array)."""
    if is_remote(root_dir):
        loc = store_location(root_dir)
        return sum((loc / name if name else loc).sizes_under().values())  # type: ignore[union-attr]
    base = Path(root_dir) / name if name else Path(root_dir)
    total = 0
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def human_bytes(n: float) -> str:
    """``n`` bytes as a short human string (decimal units: 1.5 MB = 1,500,000 bytes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
