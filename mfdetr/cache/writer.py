"""Writing images into a cache store: open / write / commit, and a background writer thread pool.

:class:`CacheWriter` writes one image at a time: every array of the image first (feature maps pasted
into their fixed zero canvas), then ``commit[i]`` (1 = done, 2 = skipped). An image interrupted before
its commit is simply pending and rewritten whole on resume; zarr's local store writes every chunk
file through a temporary file + rename, so a chunk file is never half-written either.

:class:`BackgroundWriter` runs a :class:`CacheWriter` in worker threads fed by a bounded queue, so the
detector's next batch is computed while the previous one is converted (float16, non-finite check,
device→host copy), padded, compressed and written (torch and zstd release the GIL). The first error
in a worker stops the pool and is re-raised in the main thread by
the next :meth:`BackgroundWriter.submit` or by :meth:`BackgroundWriter.close`.
"""

from __future__ import annotations

import errno
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from mfdetr.cache.codecs import check_encodable
from mfdetr.cache.schema import SKIP_REASON_BYTES, base_array_table, enc_array_name
from mfdetr.cache.location import file_size, is_remote, remote_error, storage_problem, store_location
from mfdetr.cache.chunk_files import chunk_path
from mfdetr.cache.views import ORIG, view_array_name
from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError

COMMIT_PENDING, COMMIT_DONE, COMMIT_SKIPPED = 0, 1, 2


@dataclass
class ImageRecord:
    """One image's outputs on the CPU as numpy (batch dim removed), ready to be written.

    Feature maps may be larger than their valid size (batch padding); the writer crops them.
    """

    index: int
    image_id: int
    file_name: str
    arrays: dict[str, np.ndarray]


@dataclass
class WriteStats:
    """Counters of what one writer wrote (thread-safe through :meth:`add`)."""

    done: int = 0
    skipped: list[tuple[int, int, str]] = field(default_factory=list)  # (index, image_id, reason)
    stored: dict[str, int] = field(default_factory=dict)  # bytes on disk per array
    raw_canvas: dict[str, int] = field(default_factory=dict)  # uncompressed bytes incl. padding
    raw_valid: dict[str, int] = field(default_factory=dict)  # uncompressed bytes of the valid region
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, stored: int, canvas: int, valid: int) -> None:
        with self._lock:
            self.stored[name] = self.stored.get(name, 0) + stored
            self.raw_canvas[name] = self.raw_canvas.get(name, 0) + canvas
            self.raw_valid[name] = self.raw_valid.get(name, 0) + valid

    @property
    def bytes_written(self) -> int:
        return sum(self.stored.values())


def records_from_output(
    out: DetectorOutput,
    *,
    indices: list[int],
    file_names: list[str],
    image_ids: list[int],
    logits_dtype: torch.dtype = torch.float32,
) -> list[ImageRecord]:
    """Split a batch :class:`DetectorOutput` into per-image :class:`ImageRecord` (on the CPU).

    Features are cast to float16 on their device first (halves the device→host copy). Raises
    :class:`MfdetrError` naming the image if any output is non-finite (or overflows float16).
    """
    f16 = {"queries": out.queries.to(torch.float16), "c1": out.c1.to(torch.float16)}
    for layer, maps in out.enc_maps.items():
        for lvl, m in enumerate(maps):
            f16[enc_array_name(layer, lvl)] = m.to(torch.float16)
    full = {"boxes": out.boxes.to(torch.float32), "logits": out.logits.to(logits_dtype)}
    bsz = out.batch_size
    bad = torch.zeros(bsz, dtype=torch.bool, device=out.queries.device)
    first_bad: dict[int, str] = {}
    for name, t in {**full, **f16}.items():
        # float16 maps: a float32 sum is non-finite iff some element is (|x| <= 65504, so no overflow
        # below ~5e33 elements), and it is ~2x cheaper on CPU than isfinite().all()
        flat = t.reshape(bsz, -1)
        nonfinite = (
            ~torch.isfinite(flat.sum(dim=1, dtype=torch.float32))
            if t.dtype == torch.float16
            else ~torch.isfinite(flat).all(dim=1)
        )
        if bool(nonfinite.any()):
            for b in torch.nonzero(nonfinite).flatten().tolist():
                first_bad.setdefault(b, name)
            bad |= nonfinite
    if first_bad:
        b = min(first_bad)
        raise MfdetrError(
            f"the detector returned non-finite values in '{first_bad[b]}' for image id "
            f"{image_ids[b]} ({file_names[b]}) (NaN/Inf, or beyond the float16 range); "
            "stopping — the store keeps every image committed so far"
        )
    host = {k: v.cpu().numpy() for k, v in {**full, **f16}.items()}
    host["input_hw"] = out.input_hw.cpu().numpy().astype(np.int32)
    host["orig_hw"] = out.orig_hw.cpu().numpy().astype(np.int32)
    host["level_valid_hw"] = out.level_valid_hw.cpu().numpy().astype(np.int32)
    return [
        ImageRecord(
            index=indices[b], image_id=image_ids[b], file_name=file_names[b], arrays={k: v[b] for k, v in host.items()}
        )
        for b in range(bsz)
    ]


class CacheWriter:
    """Writes images into an open store (see module doc). Thread-safe across distinct images.

    Args:
        root: the store's root group opened for writing.
        path: the store directory (for byte accounting and messages).
        manifest: the store's manifest.
        view: the view whose arrays it writes (:mod:`mfdetr.cache.views`; records use the original
            view's array names).
    """

    def __init__(self, *, root: zarr.Group, path: str | Path, manifest: dict[str, Any], view: str = ORIG) -> None:
        self.path = store_location(path)
        self.manifest = manifest
        # write_empty_chunks: skip zarr's full "is this chunk all fill value?" scan (~40% of the write time
        # of a C1 canvas); an all-zero image chunk is then stored (compressed to a few bytes) like any other.
        self.view = view
        self.arrays: dict[str, zarr.Array] = {
            s.name: root[view_array_name(view, s.name)].with_config(  # type: ignore[union-attr]
                {"write_empty_chunks": True}
            )
            for s in base_array_table(manifest)
        }
        self.level_hw = [tuple(x) for x in manifest["canvas"]["level_hw"]]
        self.c1_hw = tuple(manifest["canvas"]["c1_hw"])
        self.feature_arrays = {s.name for s in base_array_table(manifest) if s.codec == "features"}
        self.stats = WriteStats()

    # --- the three steps: write arrays, then commit ---------------------------------------------------
    def _put(self, name: str, index: int, value: np.ndarray, valid_bytes: int) -> None:
        arr = self.arrays[name]
        arr[index] = value
        stored = file_size(chunk_path(self.path, arr, index))
        self.stats.add(name, stored, value.nbytes, valid_bytes)

    def _canvas(
        self, x: np.ndarray, valid_hw: tuple[int, int], canvas_hw: tuple[int, int], what: str, rec: ImageRecord
    ) -> tuple[np.ndarray, int]:
        h, w = valid_hw
        if h > x.shape[-2] or w > x.shape[-1]:  # the detector broke its contract: not the image's fault
            raise ValueError(
                f"image id {rec.image_id}: {what} valid size {h}x{w} exceeds the returned map "
                f"{x.shape[-2]}x{x.shape[-1]}"
            )
        if h > canvas_hw[0] or w > canvas_hw[1]:  # e.g. an extremely elongated image: skip it, recorded
            raise _DoesNotFit(f"{what} valid size {h}x{w} exceeds the store canvas {canvas_hw[0]}x{canvas_hw[1]}")
        out = np.zeros((x.shape[0], *canvas_hw), dtype=np.float16)
        out[:, :h, :w] = x[:, :h, :w]
        return out, out.itemsize * x.shape[0] * h * w

    def write_image(self, rec: ImageRecord) -> None:
        """Write every array of one image, then its commit flag (last)."""
        a = rec.arrays
        i = rec.index
        try:
            lvl_hw = [tuple(int(v) for v in hw) for hw in a["level_valid_hw"]]
            ih, iw = (int(v) for v in a["input_hw"])
            maps: list[tuple[str, np.ndarray, int]] = []
            for layer in self.manifest["enc_layers"]:
                for lvl, canvas in enumerate(self.level_hw):
                    name = enc_array_name(layer, lvl)
                    if name not in a:
                        raise ValueError(f"detector output lacks encoder layer {layer} level {lvl}")
                    maps.append((name, *self._canvas(a[name], lvl_hw[lvl], canvas, f"level {lvl}", rec)))
            if "c1" in self.arrays:  # a --c1 recompute store has none
                c1_valid = (math.ceil(ih / 4), math.ceil(iw / 4))
                maps.append(("c1", *self._canvas(a["c1"], c1_valid, self.c1_hw, "C1", rec)))
        except _DoesNotFit as e:
            self.write_skip(rec.index, rec.image_id, f"{rec.file_name}: {e}")
            return
        where = f"image id {rec.image_id} ({rec.file_name})"
        for name, value in [("queries", a["queries"]), *((n, v) for n, v, _ in maps)]:
            if name in self.feature_arrays:  # values the codec preset cannot encode: stop, never store inf
                check_encodable(self.manifest, name, value, where)
        small = ("queries", "boxes", "logits", "input_hw", "orig_hw", "level_valid_hw", "image_sha256")
        for name in small:
            if name in self.arrays:
                self._put(name, i, a[name], a[name].nbytes)
        for name, value, valid in maps:
            self._put(name, i, value, valid)
        self._put("commit", i, np.array(COMMIT_DONE, dtype=np.uint8), 1)
        with self.stats._lock:
            self.stats.done += 1

    def write_skip(self, index: int, image_id: int, reason: str) -> None:
        """Record image ``index`` as skipped with ``reason`` (UTF-8, truncated to 256 bytes)."""
        raw = reason.encode("utf-8")[:SKIP_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
        buf = np.zeros(SKIP_REASON_BYTES, dtype=np.uint8)
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self._put("skip_reason", index, buf, len(raw))
        self._put("commit", index, np.array(COMMIT_SKIPPED, dtype=np.uint8), 1)
        with self.stats._lock:
            self.stats.skipped.append((index, image_id, reason))


class _DoesNotFit(Exception):
    pass


_STOP = object()


class BackgroundWriter:
    """A bounded queue drained by ``threads`` worker threads running a :class:`CacheWriter`.

    Args:
        writer: the writer doing the work.
        threads: worker threads (each compresses and writes whole images).
        queue_size: batches of records that may wait (bounds host memory).
    """

    def __init__(self, *, writer: CacheWriter, threads: int = 2, queue_size: int = 4) -> None:
        self.writer = writer
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self.completed = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"mfdetr-cache-writer-{k}", daemon=True)
            for k in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is _STOP:
                return
            if self._stopping.is_set():
                continue  # drain without work after an error
            fn, args = job
            try:
                n = fn(*args)
                with self._lock:
                    self.completed += 1 if n is None else n
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                with self._lock:
                    if self._error is None:
                        self._error = e
                self._stopping.set()

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is None:
            return
        if is_remote(self.writer.path) and not isinstance(err, MfdetrError) and storage_problem(err) is not None:
            raise remote_error(self.writer.path, err, "write the cache", resumable=True) from err
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise MfdetrError(
                f"disk full while writing the cache ({err.strerror}: {err.filename or ''}); "
                "images committed so far are kept — free space and rerun the same command "
                "to resume",
                path=self.writer.path,
            ) from err
        if isinstance(err, OSError):
            raise MfdetrError(f"cannot write the cache: {err}", path=self.writer.path) from err
        raise err

    def submit(self, fn: Callable[..., int | None], *args: Any) -> None:
        """Queue ``fn(*args)`` (blocks while the queue is full); raise a worker's error if one failed.

        ``fn`` returns how many images it completed (``None`` = 1)."""
        while True:
            self._raise_if_failed()
            try:
                self._q.put((fn, args), timeout=0.2)
                return
            except queue.Full:
                continue

    def write_records(self, records: list[ImageRecord]) -> None:
        """Queue every image of a batch (workers take images one by one)."""
        for r in records:
            self.submit(self.writer.write_image, r)

    def write_output(
        self,
        out: DetectorOutput,
        *,
        indices: list[int],
        file_names: list[str],
        image_ids: list[int],
        extra: list[dict[str, np.ndarray]] | None = None,
        writer: CacheWriter | None = None,
    ) -> None:
        """Queue a whole batch output: a worker converts it (float16 cast, non-finite check, device→host
        copy: :func:`records_from_output`) and writes its images, so the main thread goes straight back
        to the detector. A non-finite output surfaces as :class:`MfdetrError` at the next call.
        ``extra[b]`` holds more arrays of image ``b`` (e.g. ``image_sha256``); ``writer`` (default: the
        pool's) writes them, e.g. another view's."""
        target = writer or self.writer

        def job() -> int:
            nonlocal out
            with torch.inference_mode():
                records = records_from_output(out, indices=indices, file_names=file_names, image_ids=image_ids)
            out = None  # type: ignore[assignment]  # free the device tensors before the slow compression
            for r, more in zip(records, extra or [{}] * len(records), strict=True):
                r.arrays.update(more)
                target.write_image(r)
            return len(records)

        self.submit(job)

    def write_skip(self, index: int, image_id: int, reason: str, writer: CacheWriter | None = None) -> None:
        self.submit((writer or self.writer).write_skip, index, image_id, reason)

    def close(self, *, raise_errors: bool = True) -> None:
        """Finish queued work, stop the threads, and re-raise a worker's error."""
        for _ in self._threads:
            while True:
                try:
                    self._q.put(_STOP, timeout=0.2)
                    break
                except queue.Full:
                    if not any(t.is_alive() for t in self._threads):
                        break
        for t in self._threads:
            t.join()
        if raise_errors:
            self._raise_if_failed()
