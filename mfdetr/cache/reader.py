"""Reading a cache store: validated open, completeness, per-image :class:`DetectorOutput`.

The reader knows only the store and the contracts — never a detector (stage 2 must not import
``mfdetr.detectors``). A torch ``Dataset`` over the store builds on :meth:`CacheStore.read`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from mfdetr.cache.location import RemotePath, store_location, zarr_target
from mfdetr.cache.manifest import check_expectations, manifest_sha256
from mfdetr.cache.readthrough import default_cache_root, read_through
from mfdetr.cache.schema import base_array_table, c1_mode, enc_array_name
from mfdetr.cache.chunk_files import read_commit_flags
from mfdetr.cache.store import open_validated
from mfdetr.cache.verify import Damage, DamagedImage, ReadJob, checked_read, checked_reads, geometry_problem
from mfdetr.cache.views import ORIG, store_views, view_array_name
from mfdetr.cache.writer import COMMIT_DONE, COMMIT_SKIPPED
from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError

_SMALL = ("queries", "boxes", "logits", "input_hw", "orig_hw", "level_valid_hw")


class CacheStore:
    """A validated, read-only view of a cache store.

    Use :meth:`open`. Attributes: ``path``, ``manifest`` (dict), ``image_ids`` [N] int64 (store
    index → COCO image id), ``enc_layers`` and ``level_strides``, ``views`` (the views the store holds,
    :mod:`mfdetr.cache.views`) and ``view`` (the one this object reads: commit flags, skips and images
    are that view's; :meth:`for_view` gives another); ``remote_cache``: the node-local read-through
    cache folder of a store on object storage (:mod:`mfdetr.cache.readthrough`), or None.
    """

    def __init__(
        self,
        *,
        path: Path | RemotePath,
        root: zarr.Group | None,
        manifest: dict[str, Any],
        view: str = ORIG,
        remote_cache: Path | None = None,
    ) -> None:
        self.path = path
        self.remote_cache = remote_cache
        if isinstance(path, RemotePath) and remote_cache is not None:
            root = zarr.open_group(
                read_through(path.zarr_store(read_only=True), str(path), remote_cache), mode="r", zarr_format=3
            )
        self.root = root
        self.manifest = manifest
        self.image_ids: np.ndarray = root["image_ids"][:]  # type: ignore[index]
        self.enc_layers: list[int] = list(manifest["enc_layers"])
        self.level_strides: list[int] = list(manifest["level_strides"])
        self.views: list[str] = store_views(manifest)
        if view not in self.views:
            raise MfdetrError(f"cache holds the views {self.views}, not {view!r}", path=path)
        self.view = view
        # the view's arrays under their original-view names
        self._arrays: dict[str, zarr.Array] = {  # type: ignore[misc]
            s.name: root[view_array_name(view, s.name)] for s in base_array_table(manifest)
        }
        #: "store" (C1 read from the ``c1`` array) or "recompute" (no ``c1`` array: :meth:`read` returns an
        #: empty [1, C1, 0, 0] placeholder; the engine recomputes C1 with the store's stage 0)
        self.c1_mode: str = c1_mode(manifest)
        self._commit: np.ndarray | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        view: str = ORIG,
        remote_cache: str | Path | None | bool = None,
    ) -> CacheStore:
        """Open and validate the store at ``path`` (a folder or an fsspec URL such as ``s3://bucket/prefix``).

        Args:
            expect: dotted manifest paths → required values, e.g. ``{"detector.name": "dino_r50",
                "checkpoint.sha256": "…", "preprocessing": {...}, "enc_layers": [4]}``. Any
                mismatch (and any invalid manifest, unknown schema version or malformed array) raises
                :class:`MfdetrError`.
            remote_cache: for a store on object storage, the node-local read-through cache's root folder;
                ``True`` = :func:`~mfdetr.cache.readthrough.default_cache_root`, ``None``/``False`` = none
                (the default: writers, ``inspect`` and damage checks read each object once anyway).
        """
        path = store_location(path)
        root, manifest = open_validated(path)
        check_expectations(manifest, expect, where=str(path))
        cache = default_cache_root() if remote_cache is True else (Path(remote_cache) if remote_cache else None)
        return cls(
            path=path,
            root=root,
            manifest=manifest,
            view=view,
            remote_cache=cache if isinstance(path, RemotePath) else None,
        )

    def for_view(self, view: str) -> CacheStore:
        """The same store read through ``view`` (no reopening or revalidation)."""
        return (
            self
            if view == self.view
            else CacheStore(
                path=self.path, root=self.root, manifest=self.manifest, view=view, remote_cache=self.remote_cache
            )
        )

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def manifest_sha256(self) -> str:
        """sha256 of the canonical manifest JSON (``created_utc`` included): what a training run records."""
        return manifest_sha256(self.manifest)

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: reopen lazily
        return {"path": self.path, "manifest": self.manifest, "view": self.view, "remote_cache": self.remote_cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        cache = state.get("remote_cache")
        root = (
            None
            if cache is not None and isinstance(state["path"], RemotePath)  # opened by __init__
            else zarr.open_group(zarr_target(state["path"], read_only=True), mode="r", zarr_format=3)
        )
        self.__init__(
            path=state["path"],
            root=root,
            manifest=state["manifest"],  # type: ignore[misc]
            view=state.get("view", ORIG),
            remote_cache=cache,
        )

    # --- completeness -------------------------------------------------------------------------------
    def commit_flags(self, *, refresh: bool = False) -> np.ndarray:
        """[N] uint8: 0 pending, 1 done, 2 skipped (cached; ``refresh`` rereads)."""
        if self._commit is None or refresh:
            self._commit = read_commit_flags(self.path, self._arrays["commit"])
        assert self._commit is not None
        return self._commit

    def complete_indices(self) -> np.ndarray:
        """Store indices whose images are fully written (commit == 1), ascending."""
        return np.flatnonzero(self.commit_flags() == COMMIT_DONE)

    def skipped(self) -> list[tuple[int, int, str]]:
        """``(index, image_id, reason)`` of every skipped image."""
        out = []
        for i in np.flatnonzero(self.commit_flags() == COMMIT_SKIPPED).tolist():
            try:
                raw = bytes(self._arrays["skip_reason"][i]).rstrip(b"\0")
            except Exception as e:  # noqa: BLE001 - a damaged reason is no reason to stop
                raw = f"(reason unreadable: {type(e).__name__})".encode()
            out.append((i, int(self.image_ids[i]), raw.decode("utf-8", "replace")))
        return out

    def index_of(self, image_id: int) -> int:
        hit = np.flatnonzero(self.image_ids == image_id)
        if not len(hit):
            raise KeyError(f"image id {image_id} is not in cache {self.path}")
        return int(hit[0])

    # --- per-image reads ----------------------------------------------------------------------------
    def _job(self, index: int, names: Sequence[str], regions: Mapping[str, tuple[int, int]] | None) -> ReadJob:
        def key(n: str) -> Any:
            if regions is not None and n in regions:
                h, w = regions[n]
                return (index, slice(None), slice(0, h), slice(0, w))
            return index

        return ReadJob(
            path=self.path, arrays=self._arrays, image_id=int(self.image_ids[index]), index=index, names=names, key=key
        )

    def read_arrays(
        self, index: int, names: Sequence[str], regions: Mapping[str, tuple[int, int]] | None = None
    ) -> dict[str, np.ndarray]:
        """Raw stored arrays of image ``index`` (batch dim removed), all read at once.

        Maps are canvas-sized unless ``regions`` gives ``name → (h, w)``: then only ``[..., :h, :w]`` is
        read (and only the tiles it overlaps are decoded). A missing or empty chunk file, a chunk that
        fails to decode (checksum) or non-finite floats raise
        :class:`~mfdetr.cache.verify.DamagedImage` (never the fill value or garbage).
        """
        return checked_read(self._job(index, list(names), regions))

    def read(
        self, index: int, *, enc_layers: Sequence[int] | None = None, crop: bool = True, check_commit: bool = True
    ) -> tuple[DetectorOutput, int]:
        """Image ``index`` as a :class:`DetectorOutput` with batch dim 1 (CPU tensors), and its image id.

        Features stay float16 (boxes float32, logits as stored). Only the requested encoder layers
        (default: all stored) are read. A ``--c1 recompute`` store returns C1 as an empty
        ``[1, C1, 0, 0]`` placeholder (see :attr:`c1_mode`). ``crop=True`` returns every map cut to its valid size
        (``level_valid_hw``; C1 to ``ceil(input_hw / 4)``); ``crop=False`` returns the zero-padded canvases.
        A damaged image raises :class:`~mfdetr.cache.verify.DamagedImage`.
        """
        res = self.read_many([index], enc_layers=enc_layers, crop=crop, check_commit=check_commit)[0]
        if isinstance(res, MfdetrError):
            raise res
        return res

    def read_many(
        self,
        indices: Sequence[int],
        *,
        enc_layers: Sequence[int] | None = None,
        crop: bool = True,
        check_commit: bool = True,
    ) -> list[tuple[DetectorOutput, int] | MfdetrError]:
        """:meth:`read` of several images, their arrays read together (two rounds for all of them: the
        small arrays, then the maps cut to each image's valid size). Per image: its ``(output, image id)``,
        or the error it is (a :class:`~mfdetr.cache.verify.DamagedImage`, or the one-line error of a
        failed read from object storage). An index out of range or not committed raises at once."""
        layers = self._layers(enc_layers)
        for index in indices:
            self._check_committed(index, check_commit)
        out: list[tuple[DetectorOutput, int] | MfdetrError] = list(
            checked_reads([self._job(i, list(_SMALL), None) for i in indices])
        )
        jobs = {}
        for k, (index, a) in enumerate(zip(indices, out, strict=True)):
            if isinstance(a, MfdetrError):
                continue
            geo = geometry_problem(a, self.manifest)
            if geo:
                out[k] = DamagedImage(Damage(str(self.path), index, int(self.image_ids[index]), *geo))
                continue
            regions = self._regions(a, layers)
            jobs[k] = self._job(index, list(regions), regions if crop else None)
        maps = checked_reads(list(jobs.values()))
        for (k, job), m in zip(jobs.items(), maps, strict=True):
            small = out[k]
            assert isinstance(small, dict)
            out[k] = m if isinstance(m, MfdetrError) else (self._output({**small, **m}, layers), job.image_id)
        return out

    def _layers(self, enc_layers: Sequence[int] | None) -> list[int]:
        layers = self.enc_layers if enc_layers is None else [int(e) for e in enc_layers]
        missing = sorted(set(layers) - set(self.enc_layers))
        if missing:
            raise MfdetrError(
                f"cache holds encoder layers {self.enc_layers}, layers {missing} were asked for", path=self.path
            )
        return layers

    def _check_committed(self, index: int, check_commit: bool) -> None:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a cache of {n} images")
        if check_commit and int(self.commit_flags()[index]) != COMMIT_DONE:
            self.commit_flags(refresh=True)
            if int(self.commit_flags()[index]) != COMMIT_DONE:
                raise MfdetrError(
                    f"image index {index} (id {int(self.image_ids[index])}) is not complete in "
                    "this cache (pending or skipped)",
                    path=self.path,
                )

    def _regions(self, a: Mapping[str, np.ndarray], layers: list[int]) -> dict[str, tuple[int, int]]:
        """The maps of an image and their valid sizes (only the valid region is read when cropping, so
        only the tiles it overlaps are decoded)."""
        lvl_hw = a["level_valid_hw"].astype(np.int64)
        ih, iw = (int(v) for v in a["input_hw"])
        regions = {"c1": (math.ceil(ih / 4), math.ceil(iw / 4))} if self.c1_mode == "store" else {}
        for e in layers:
            for lvl in range(len(self.level_strides)):
                regions[enc_array_name(e, lvl)] = (int(lvl_hw[lvl][0]), int(lvl_hw[lvl][1]))
        return regions

    def _output(self, a: Mapping[str, np.ndarray], layers: list[int]) -> DetectorOutput:
        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x))[None]

        enc = {e: [t(a[enc_array_name(e, lvl)]) for lvl in range(len(self.level_strides))] for e in layers}
        return DetectorOutput(
            queries=t(a["queries"]),
            boxes=t(a["boxes"]),
            logits=t(a["logits"]),
            enc_maps=enc,
            c1=t(a["c1"])
            if "c1" in a
            else torch.zeros(1, int(self.manifest["c1_channels"]), 0, 0, dtype=torch.float16),
            input_hw=t(a["input_hw"].astype(np.int64)),
            orig_hw=t(a["orig_hw"].astype(np.int64)),
            level_valid_hw=t(a["level_valid_hw"].astype(np.int64)),
        )

    def image_sha256(self, index: int) -> str:
        """sha256 (hex) of image ``index``'s file as the writer read it (``--c1 recompute`` stores only)."""
        if "image_sha256" not in self._arrays:
            raise MfdetrError("this cache records no image sha256 (it stores C1)", path=self.path)
        return bytes(self._arrays["image_sha256"][index]).hex()
