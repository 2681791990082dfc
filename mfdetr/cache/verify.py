"""Checking that a committed image's stored arrays are really there and decode to finite numbers.

Zarr reads a missing chunk (or an empty shard file) as the fill value, so a chunk file lost to an
interrupted copy or a full quota would silently read as zeros. Every checked read therefore

1. requires the image's chunk file of each array to exist and be non-empty (:func:`file_problem`);
2. decodes it, turning any decoder failure — a crc32c mismatch of a truncated or altered chunk in a
   store with checksums (``manifest.codecs.checksum``), a zstd error, a bad shard index — into a
   :class:`DamagedImage` (:func:`decode_problem`);
3. requires float arrays to be finite (:func:`nonfinite_problem`).

A :class:`DamagedImage` names the store, the image id and index, the array and the problem (one line).
:func:`find_damaged` runs the same checks over a store: ``full=False`` only looks at commit flags and
file presence (cheap: one ``stat`` per array and image), ``full=True`` decodes every committed image.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from mfdetr.cache.location import file_size, is_remote, remote_error, storage_problem
from mfdetr.cache.readthrough import ReadThroughStore
from mfdetr.cache.chunk_files import chunk_path
from mfdetr.errors import MfdetrError

COMMIT_DONE, COMMIT_SKIPPED = 1, 2
#: arrays that are not per-image data of a committed image
NOT_IMAGE_DATA = ("image_ids", "commit", "skip_reason")
REPAIR_HINT = (
    "rerun the `mfdetr cache` command that wrote it with --repair to recompute it, or pass "
    "--skip-damaged to leave it out"
)


@dataclass(frozen=True)
class Damage:
    """What is wrong with one image of one store."""

    store: str
    index: int
    image_id: int
    array: str
    problem: str

    def describe(self) -> str:
        return f"image id {self.image_id} (index {self.index}), array '{self.array}': {self.problem}"


class DamagedImage(MfdetrError):
    """A committed image whose stored data cannot be trusted (see the module doc)."""

    def __init__(self, damage: Damage | str) -> None:
        if isinstance(damage, str):  # a message only: how torch re-raises a DataLoader worker's error
            self.damage = None
            super().__init__(damage)
            return
        self.damage = damage
        super().__init__(f"damaged cache: {damage.describe()}; {REPAIR_HINT}", path=damage.store)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (DataLoader workers)
        return (DamagedImage, (self.damage,))


def commit_problem(flag: int) -> str | None:
    """Why a commit flag is damage (``None`` for 0 pending, 1 done, 2 skipped)."""
    if int(flag) in (0, COMMIT_DONE, COMMIT_SKIPPED):
        return None
    return f"commit flag is {int(flag)} (expected 0 pending, 1 done or 2 skipped)"


def file_problem(root_dir: str | Path, arr: zarr.Array, index: int) -> str | None:
    """Why image ``index``'s chunk (or shard) file of ``arr`` cannot hold its data: missing or empty."""
    p = chunk_path(root_dir, arr, index)
    if is_remote(p):
        cached = arr.store_path.store
        try:
            size = (
                cached.object_size(str(p.relative_to(root_dir)))  # type: ignore[arg-type]
                if isinstance(cached, ReadThroughStore)
                else file_size(p)
            )
        except FileNotFoundError:
            return f"chunk object {p.relative_to(root_dir)} is missing"  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - a storage failure is not damage of the image
            raise remote_error(root_dir, e, "read the cache") from None
        return f"chunk object {p.relative_to(root_dir)} is empty" if size == 0 else None  # type: ignore[arg-type]
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return f"chunk file {p.relative_to(root_dir)} is missing"
    except OSError as e:
        return f"chunk file {p.relative_to(root_dir)} cannot be read ({e.strerror})"
    # only a regular file is judged by its size (a pipe or device reports 0 and is left to the reader)
    empty = stat.S_ISREG(st.st_mode) and st.st_size == 0
    return f"chunk file {p.relative_to(root_dir)} is empty" if empty else None


def decode_problem(err: BaseException) -> str:
    """A decoder failure as one line."""
    msg = " ".join(str(err).split())[:160]
    if "checksum" in msg.lower():
        return f"checksum mismatch: the chunk is truncated or altered ({msg})"
    return f"cannot decode the chunk, truncated or altered ({type(err).__name__}: {msg})"


_EXPONENT_BITS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}


def nonfinite_problem(x: np.ndarray) -> str | None:
    """Why a float array is not usable data: it holds NaN or Inf."""
    if x.dtype.kind != "f" or not x.size:
        return None
    exp = _EXPONENT_BITS.get(x.dtype.itemsize)
    if exp is not None and x.flags.c_contiguous:  # NaN/Inf iff all exponent bits are set: ~4x faster than isfinite
        bits, mask = x.view(f"u{x.dtype.itemsize}"), np.array(exp, dtype=f"u{x.dtype.itemsize}")
        ok = int(np.bitwise_and(bits, mask).max()) != exp
    else:
        ok = bool(np.isfinite(x).all())
    if ok:
        return None
    bad = int((~np.isfinite(x)).sum())
    return f"{bad} non-finite value(s) (NaN/Inf) in the stored data"


def geometry_problem(a: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(array, problem)`` if an image's stored sizes cannot be true (outside the store's canvas, or
    below 1), else ``None``. ``a`` holds its ``input_hw``, ``orig_hw`` and ``level_valid_hw``."""
    canvas = manifest["canvas"]
    limits = {
        "input_hw": (np.asarray(canvas["input_hw"]), a["input_hw"]),
        "level_valid_hw": (np.asarray(canvas["level_hw"]), a["level_valid_hw"]),
        "orig_hw": (None, a["orig_hw"]),
    }
    for name, (hi, x) in limits.items():
        if (x < 1).any() or (hi is not None and (x.shape != hi.shape or (x > hi).any())):
            return name, f"stored size {x.tolist()} is impossible (canvas {None if hi is None else hi.tolist()})"
    return None


@dataclass(frozen=True)
class ReadJob:
    """The arrays ``names`` of image ``index`` (id ``image_id``) of the store at ``path``: ``arrays[name][key(name)]``."""

    path: Any
    arrays: Mapping[str, zarr.Array]
    image_id: int
    index: int
    names: Sequence[str]
    key: Callable[[str], Any]

    def damaged(self, name: str, problem: str) -> DamagedImage:  # named as stored (a view's: hflip_<name>)
        return DamagedImage(
            Damage(str(self.path), self.index, self.image_id, str(self.arrays[name].path or name), problem)
        )


async def _gather(calls: list[Any]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


def checked_reads(jobs: Sequence[ReadJob]) -> list[dict[str, np.ndarray] | MfdetrError]:
    """Every job's arrays read at once (one gather on zarr's event loop: the reads of all images wait
    together, not one array after another), each job's result checked as :func:`checked_read` does.

    Returns, per job, its arrays (batch dim removed) or the error it is: a :class:`DamagedImage` for a
    missing/empty file, a decoder failure or non-finite floats (the first one found), or the one-line
    error of a failed read from object storage."""
    out: list[dict[str, np.ndarray] | MfdetrError] = [{} for _ in jobs]
    calls: list[tuple[int, str, Any]] = []
    for j, job in enumerate(jobs):
        problem = next(((n, p) for n in job.names if (p := file_problem(job.path, job.arrays[n], job.index))), None)
        if problem is not None:
            out[j] = job.damaged(*problem)
            continue
        calls.extend((j, n, job.arrays[n].async_array.getitem(job.key(n))) for n in job.names)
    values = sync(_gather([c for _, _, c in calls])) if calls else []
    for (j, n, _), v in zip(calls, values, strict=True):
        res, job = out[j], jobs[j]
        if not isinstance(res, dict):  # the job's first error stands
            continue
        if isinstance(v, BaseException):
            if not isinstance(v, Exception):
                raise v
            remote = is_remote(job.path) and storage_problem(v) is not None
            out[j] = remote_error(job.path, v, "read the cache") if remote else job.damaged(n, decode_problem(v))
            continue
        res[n] = v = np.asarray(v)
        problem = nonfinite_problem(v)
        if problem:
            out[j] = job.damaged(n, problem)
    return out


def checked_read(job: ReadJob) -> dict[str, np.ndarray]:
    """Read ``job.arrays[name][job.key(name)]`` for every name, raising :class:`DamagedImage` for a
    missing/empty file, a decoder failure or non-finite float values (see :func:`checked_reads`)."""
    res = checked_reads([job])[0]
    if not isinstance(res, dict):
        raise res
    return res


def image_arrays(manifest: Mapping[str, Any]) -> list[str]:
    """The arrays a committed image owns in one view (what a full check decodes), named as in the
    original view (a :class:`~mfdetr.cache.reader.CacheStore` maps them to its view's arrays)."""
    from mfdetr.cache.schema import base_array_table

    return [s.name for s in base_array_table(dict(manifest)) if s.name not in NOT_IMAGE_DATA]


def find_damaged(
    store: Any, *, full: bool, indices: Iterable[int] | None = None, progress: Callable[[int], None] | None = None
) -> list[Damage]:
    """Damaged images of an open :class:`~mfdetr.cache.reader.CacheStore`'s view (one :class:`Damage` each).

    Commit flags outside 0/1/2 always count. Committed images (flag 1) are checked for missing or
    empty chunk files, and with ``full`` decoded whole (checksums, decoder, finite floats).
    ``indices`` restricts the check (e.g. to one shard's images); ``progress(n)`` is called per image.
    """
    flags = store.commit_flags(refresh=True)
    todo = np.arange(len(flags)) if indices is None else np.asarray(list(indices), dtype=np.int64)
    names = image_arrays(store.manifest)
    out: list[Damage] = []
    for i in todo.tolist():
        iid = int(store.image_ids[i])
        problem = commit_problem(flags[i])
        if problem:
            out.append(Damage(str(store.path), i, iid, str(store._arrays["commit"].path), problem))
        elif flags[i] == COMMIT_DONE:
            try:
                if full:
                    geo = geometry_problem(store.read_arrays(i, names), store.manifest)
                    if geo:
                        raise DamagedImage(Damage(str(store.path), i, iid, *geo))
                else:
                    for n in names:
                        fp = file_problem(store.path, store._arrays[n], i)
                        if fp:
                            raise DamagedImage(Damage(str(store.path), i, iid, str(store._arrays[n].path), fp))
            except DamagedImage as e:
                assert e.damage is not None
                out.append(e.damage)
        if progress is not None:
            progress(1)
    return out


__all__ = [
    "Damage",
    "DamagedImage",
    "REPAIR_HINT",
    "ReadJob",
    "checked_read",
    "checked_reads",
    "commit_problem",
    "decode_problem",
    "file_problem",
    "find_damaged",
    "geometry_problem",
    "image_arrays",
    "nonfinite_problem",
]
