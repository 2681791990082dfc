"""The cache-backed stage-2 dataset: cached detector outputs + GT instances, per image.

:class:`CacheDataset` wraps a validated :class:`~mfdetr.cache.CacheStore` and the COCO annotation file
its manifest names (checked by sha256, so GT and features always belong together). Item ``i`` is
``(DetectorOutput with batch 1 — float16 features, cropped to their valid size —, GTInstances)``;
:func:`~mfdetr.engine.collate.collate_detector_outputs` pads a list of them into a batch.

A ``--c1 recompute`` cache stores no C1: item ``i`` then also carries the preprocessed image, and
:attr:`CacheDataset.prepare_batch` recomputes C1 on the training device (:mod:`mfdetr.engine.c1_recompute`).

Only complete images (commit flag done) are used. A cache still being written (pending images) is
trained on its complete part with a warning naming how many are missing, or refused with
``require_complete``; images the writer skipped (unreadable files) are reported and left out.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset

from mfdetr.cache import CacheStore
from mfdetr.cache.manifest import manifest_sha256  # noqa: F401 - re-exported for the engine
from mfdetr.cache.verify import COMMIT_SKIPPED, Damage, DamagedImage, commit_problem
from mfdetr.cache.views import HFLIP, ORIG
from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.data.flip import hflip_instances
from mfdetr.engine.damage import DamagedItem
from mfdetr.errors import MfdetrError

if TYPE_CHECKING:
    from mfdetr.data import CocoInstances

# What two caches must share to be used by one MaskNet (train vs val, checkpoint vs eval cache).
IDENTITY_KEYS = (
    "detector.name",
    "checkpoint.sha256",
    "hidden_dim",
    "level_strides",
    "c1_channels",
    "num_classes",
    "preprocessing",
    "category_map",
)


def _get(m: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = m
    for p in dotted.split("."):
        cur = cur[p]
    return cur


def detector_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest values a trained MaskNet depends on (recorded in checkpoints)."""
    return {k: _get(manifest, k) for k in IDENTITY_KEYS}


def open_cache(
    path: str | Path, *, identity: Mapping[str, Any] | None = None, enc_layer: int | None = None, role: str = "cache"
) -> CacheStore:
    """Open and validate a cache store; with ``identity`` (from another cache or a checkpoint) refuse a
    cache of another detector/checkpoint/preprocessing; with ``enc_layer`` refuse a cache lacking it."""
    from mfdetr.cache.location import RemotePath, store_location

    p = store_location(path)
    if not isinstance(p, RemotePath) and not p.exists():  # a remote store's absence is told by CacheStore.open
        raise MfdetrError(f"{role} not found", path=p)
    store = CacheStore.open(p, expect=dict(identity) if identity else None, remote_cache=True)
    if enc_layer is not None and enc_layer not in store.enc_layers:
        raise MfdetrError(
            f"{role} holds encoder layers {store.enc_layers}, the MaskNet config uses "
            f"masknet.enc_layer={enc_layer} (write the cache with --enc-layers {enc_layer})",
            path=p,
        )
    return store


def open_annotations(
    store: CacheStore, *, coco: str | Path | None, annotations: str | Path | None = None, with_targets: bool = True
) -> CocoInstances:
    """The COCO split a cache was written from, as :class:`mfdetr.data.CocoInstances`.

    ``coco`` is the COCO folder; the annotation file is the one the manifest names
    (``<coco>/annotations/<file>``) unless ``annotations`` overrides it. Without ``coco``, the folder
    and file ``mfdetr cache`` recorded in the store (``mfdetr_source.json``) are used when they still
    exist. The file's sha256 must equal the manifest's, so GT and cached features always belong together.
    """
    from mfdetr.data import CocoInstances

    src = store.manifest["source"]
    hinted = None
    if coco is None:
        hinted = _source_hint(store)
        if hinted is None:
            raise MfdetrError(
                f"the GT annotations of cache {store.path} are needed: pass --coco DIR (the COCO "
                f"folder with annotations/{src['annotation_file']})"
            )
        coco = hinted["coco_root"]
    if annotations is not None:
        path = Path(annotations)
    elif hinted is not None:
        path = Path(hinted["annotation_path"])
    else:
        path = Path(coco) / "annotations" / src["annotation_file"]
    ds = CocoInstances(coco, src["split"], annotation_file=path, with_targets=with_targets)
    if ds.annotation_sha256 != src["annotation_sha256"]:
        raise MfdetrError(
            f"sha256 differs from the annotation file cache {store.path} was written from "
            f"({src['annotation_file']}, {src['annotation_sha256'][:12]}…)",
            path=path,
        )
    return ds


def _source_hint(store: CacheStore) -> dict[str, str] | None:
    """The COCO folder / annotation file recorded at cache time, if both still exist here."""
    import json

    from mfdetr.cache.manifest import SOURCE_HINT

    try:
        hint = json.loads((store.path / SOURCE_HINT).read_text())
        ok = Path(hint["coco_root"]).is_dir() and Path(hint["annotation_path"]).is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"coco_root": str(hint["coco_root"]), "annotation_path": str(hint["annotation_path"])} if ok else None


class Kept(NamedTuple):
    """A store read (and the image's GT where loaded) an item is built from."""

    det: DetectorOutput
    image_id: int
    target: GTInstances | None = None


def _kept_bytes(det: DetectorOutput, target: GTInstances) -> int:
    """Bytes of the tensors of a read image and its GT."""
    fields = (det.queries, det.boxes, det.logits, det.c1, det.input_hw, det.orig_hw, det.level_valid_hw)
    maps = [m for levels in det.enc_maps.values() for m in levels]
    gt = (target.boxes, target.labels, target.masks, target.iscrowd)
    return sum(t.nbytes for t in (*fields, *maps, *gt))


class CacheDataset(Dataset[tuple[DetectorOutput, GTInstances]]):
    """Complete images of a cache store as ``(DetectorOutput [B=1], GTInstances)``.

    Args:
        store: an opened store (see :func:`open_cache`).
        coco_split: the COCO split it was written from (see :func:`open_annotations`); its
            ``load_targets(image_id)`` gives the GT instances.
        enc_layer: the cached encoder layer to read (only that one is read from disk).
        require_complete: refuse a cache with pending images instead of warning.
        max_images: keep only the first N complete images (0 = all).
        on_damaged: what an item of a damaged image is (:mod:`mfdetr.engine.damage`): ``"raise"``
            :class:`~mfdetr.cache.verify.DamagedImage`; ``"substitute"`` the next intact image, the
            damage listed in ``det.extras["damaged"]`` (training); ``"mark"`` a
            :class:`~mfdetr.engine.damage.DamagedItem` (evaluation). Images whose commit flag is
            damaged are never used; they are in :attr:`damaged_commits` (raised at once with ``"raise"``).
        memory_bytes: keep up to this many bytes of read images in this process's memory, so that a later
            epoch takes them from there instead of reading and decoding them again (0 = off). Images are
            kept in the order they are first read until the budget is spent (with a random order, every
            image then has the same chance of being kept); damaged reads are never kept. Each DataLoader
            worker keeps its own (the kept images are not pickled to workers).
    """

    def __init__(
        self,
        *,
        store: CacheStore,
        coco_split: Any,
        enc_layer: int,
        require_complete: bool = False,
        max_images: int = 0,
        on_damaged: str = "raise",
        memory_bytes: int = 0,
    ) -> None:
        if on_damaged not in ("raise", "substitute", "mark"):
            raise ValueError(f"on_damaged={on_damaged!r}")
        self.store = store
        self.coco = coco_split
        self.enc_layer = int(enc_layer)
        self.on_damaged = on_damaged
        flags = store.commit_flags(refresh=True)
        self.damaged_commits = [
            Damage(str(store.path), int(i), int(store.image_ids[i]), "commit", commit_problem(flags[i]) or "")
            for i in np.flatnonzero(flags > COMMIT_SKIPPED).tolist()
        ]
        if self.damaged_commits and on_damaged == "raise":
            raise DamagedImage(self.damaged_commits[0])
        complete = store.complete_indices()
        skipped = store.skipped()
        pending = len(store) - len(complete) - len(skipped) - len(self.damaged_commits)
        if pending and require_complete:
            raise MfdetrError(
                f"cache is incomplete: {pending} of {len(store)} images not written yet "
                "(finish `mfdetr cache` or drop --require-complete)",
                path=store.path,
            )
        if pending or skipped or self.damaged_commits:
            if os.environ.get("RANK", "0") == "0":
                bad = f", {len(self.damaged_commits)} with a damaged commit flag" if self.damaged_commits else ""
                print(
                    f"mfdetr: warning: {store.path}: using {len(complete)} of {len(store)} images "
                    f"({pending} not written yet, {len(skipped)} skipped by the cache writer{bad})",
                    file=sys.stderr,
                )
        if not len(complete):
            raise MfdetrError("cache holds no complete image", path=store.path)
        self.indices: np.ndarray = complete[:max_images] if max_images > 0 else complete
        self.num_pending, self.num_skipped = int(pending), len(skipped)
        self.image_ids = [int(store.image_ids[i]) for i in self.indices]
        #: ``--c1 recompute`` caches: the images are decoded here (in the workers) and the trainer's
        #: ``prepare_batch`` runs the cache's stage 0 (:mod:`mfdetr.engine.c1_recompute`); else ``None``
        self.prepare_batch: Any = None
        self._images: Any = None
        self.memory_bytes = max(0, int(memory_bytes))
        self._kept: dict[tuple[str, int], Kept] = {}
        self._kept_bytes = 0
        if store.c1_mode == "recompute":
            from mfdetr.engine.c1_recompute import C1Recompute, ImageSource

            self.prepare_batch = C1Recompute(store)
            self._images = ImageSource(store, coco_split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        try:
            return self._item(i, [])
        except DamagedImage as e:
            if self.on_damaged == "raise" or e.damage is None:
                raise
            if self.on_damaged == "mark":
                return DamagedItem(e.damage)
            damaged = [e.damage]
        for k in range(1, len(self.indices)):  # substitute: the next intact image
            try:
                return self._item((i + k) % len(self.indices), damaged)
            except DamagedImage as e:
                if e.damage is None:
                    raise
                damaged.append(e.damage)
        raise MfdetrError(
            f"no intact image left to train on (first damaged: {damaged[0].describe()})", path=self.store.path
        )

    def __getitems__(self, items: list[int]) -> list[Any]:
        """``[self[i] for i in items]`` with the images of every view read together (what a DataLoader
        calls for a batch): the stored arrays of all of them are read at once, not one image after another.
        A damaged image takes the path of ``self[i]`` (substitute, mark or raise)."""
        out: list[Any] = [None] * len(items)
        by_view: dict[str, list[int]] = {}
        for k, i in enumerate(items):
            by_view.setdefault(self.view_of(i), []).append(k)
        for view, ks in by_view.items():
            kept = {k: self._recall(view, int(self.indices[items[k]])) for k in ks}
            ks = [k for k in ks if kept[k] is None]
            reads = self.store.for_view(view).read_many(
                [int(self.indices[items[k]]) for k in ks], enc_layers=[self.enc_layer]
            )
            for k, r in zip(ks, reads, strict=True):
                if isinstance(r, DamagedImage) and r.damage is not None:
                    out[k] = self[items[k]]
                elif isinstance(r, MfdetrError):
                    raise r
                else:
                    kept[k] = self._keep(view, int(self.indices[items[k]]), *r)
            for k, got in kept.items():
                if got is not None and out[k] is None:
                    out[k] = self._finish(items[k], view, got, [])
        return out

    def view_of(self, i: int) -> str:
        """The stored view item ``i`` reads (:mod:`mfdetr.cache.views`): the original image here;
        :class:`~mfdetr.engine.cache_views.ViewSampledDataset` samples one per image and epoch."""
        return ORIG

    def _item(self, i: int, damaged: list[Damage]) -> tuple[DetectorOutput, GTInstances]:
        index = int(self.indices[i])
        view = self.view_of(i)
        got = self._recall(view, index)
        if got is None:
            got = self._keep(view, index, *self.store.for_view(view).read(index, enc_layers=[self.enc_layer]))
        return self._finish(i, view, got, damaged)

    def _keep(self, view: str, index: int, det: DetectorOutput, image_id: int) -> Kept:
        """A fresh read of store image ``index`` (``view``) with its GT, kept in memory while the budget allows;
        returns what the item is built from (new containers around the kept tensors)."""
        if not self.memory_bytes or (view, index) in self._kept:  # kept already: a repeat within one batch
            return Kept(det, image_id)
        target = self.coco.load_targets(image_id)
        size = _kept_bytes(det, target)
        if self._kept_bytes + size > self.memory_bytes:
            return Kept(det, image_id, target)
        self._kept[(view, index)] = Kept(det, image_id, target)
        self._kept_bytes += size
        return self._recall(view, index)  # type: ignore[return-value]

    def _recall(self, view: str, index: int) -> Kept | None:
        """A kept read, as new containers around the kept tensors (the item's extras never reach them)."""
        got = self._kept.get((view, index))
        if got is None:
            return None
        det = got.det
        maps = {layer: list(levels) for layer, levels in det.enc_maps.items()}
        det = dataclasses.replace(det, enc_maps=maps, extras=dict(det.extras))
        return Kept(det, got.image_id, None if got.target is None else dataclasses.replace(got.target))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a worker starts with nothing kept and keeps its own
        state["_kept"], state["_kept_bytes"] = {}, 0
        return state

    def _finish(self, i: int, view: str, got: Kept, damaged: list[Damage]) -> tuple[DetectorOutput, GTInstances]:
        """Item ``i`` from its read (of ``view``): image id and damage noted, image and GT attached."""
        index = int(self.indices[i])
        det, image_id = got.det, got.image_id
        det.extras["image_id"] = [image_id]
        if self.on_damaged == "substitute":
            det.extras["damaged"] = list(damaged)
        if self._images is not None:
            from mfdetr.engine.c1_recompute import ERROR_KEY, IMAGE_KEY

            hw = (int(det.input_hw[0, 0]), int(det.input_hw[0, 1]))
            image, error = self._images.load(self.store, index, image_id, hw)
            if image is not None and view == HFLIP:  # the preprocessed image the flipped view was computed on
                image = image.flip(-1)
            det.extras[IMAGE_KEY], det.extras[ERROR_KEY] = [image], [error]
        target = self.coco.load_targets(image_id) if got.target is None else got.target
        return det, (hflip_instances(target) if view == HFLIP else target)
