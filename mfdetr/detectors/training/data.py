"""Detector training data: a COCO split as (image, normalised boxes, head-slot labels), cached in memory.

- Images go through the detector's evaluation preprocessing (:class:`mfdetr.data.EvalTransform`, the
  preset's short/long side and mean/std) once and are cached as float16 (the synthetic set at 160 px:
  ~0.2 MB per image).
- Targets follow DINO's ``ConvertCocoPolysToMask``: crowd annotations and boxes without area are
  dropped; ``boxes`` are the COCO ``bbox`` (x, y, w, h in original pixels) as cxcywh normalised by the
  original size (resizing keeps relative coordinates); ``labels`` are head slots
  (``class_to_category.index(category_id)``).
- Augmentation: horizontal flip with probability ``hflip`` (``cx → 1 − cx``), decided by
  ``numpy.random.default_rng([seed, epoch, index])`` so a run is reproducible and resumable at any step.
- Batches hold images of one orientation (:func:`epoch_batches`), so padding stays small.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mfdetr.contracts import Preprocessing
from mfdetr.data import EvalTransform, load_annotation_file, load_rgb
from mfdetr.errors import MfdetrError, SkipImage


@dataclass
class TrainBatch:
    """A padded batch: ``images`` [B, 3, Hp, Wp] float32, ``pad_mask`` [B, Hp, Wp] True at padding,
    ``targets`` per image ``{"labels": [N] int64, "boxes": [N, 4] normalised cxcywh}``."""

    images: Tensor
    pad_mask: Tensor
    targets: list[dict[str, Tensor]]
    image_ids: list[int]


class DetectionTrainSet:
    """A COCO split for detector training.

    Args:
        root: COCO folder (``root/{split}/``, ``root/annotations/instances_{split}.json``).
        split: e.g. ``"train2017"``.
        preprocessing: the detector preset's preprocessing.
        class_to_category: category id of every head slot; annotations of other categories are an error.
        max_images: keep only the first ``max_images`` images by id (0 = all).
        by_size: batch images of one network-input size only (no padding), else of one orientation.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        preprocessing: Preprocessing,
        class_to_category: Sequence[int],
        max_images: int = 0,
        by_size: bool = True,
    ) -> None:
        self.root = Path(root)
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise MfdetrError(
                f"split folder not found (expected the images of split '{split}' there)", path=self.image_dir
            )
        data, _ = load_annotation_file(self.root / "annotations" / f"instances_{split}.json")
        slots = {int(c): i for i, c in enumerate(class_to_category) if int(c) > 0}
        images = sorted(data["images"], key=lambda im: im["id"])
        if max_images > 0:
            images = images[:max_images]
        self.images = images
        self.transform = EvalTransform(preprocessing=preprocessing)
        anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            anns.setdefault(int(a["image_id"]), []).append(a)
        self._targets: list[dict[str, Tensor]] = []
        for im in images:
            w0, h0 = float(im["width"]), float(im["height"])
            labels, boxes = [], []
            for a in sorted(anns.get(int(im["id"]), []), key=lambda a: a["id"]):
                if a["iscrowd"]:
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                x0, y0 = max(x, 0.0), max(y, 0.0)
                x1, y1 = min(x + w, w0), min(y + h, h0)
                if x1 <= x0 or y1 <= y0:
                    continue
                if int(a["category_id"]) not in slots:
                    raise MfdetrError(
                        f"category id {a['category_id']} is not one of the detector's classes {sorted(slots)}",
                        path=self.root / "annotations",
                    )
                labels.append(slots[int(a["category_id"])])
                boxes.append([(x0 + x1) / 2 / w0, (y0 + y1) / 2 / h0, (x1 - x0) / w0, (y1 - y0) / h0])
            self._targets.append(
                {
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                }
            )
        self._cache: dict[int, Tensor] = {}
        #: images that cannot be loaded (index → reason); another image of their group takes their place
        self.bad: dict[int, str] = {}
        self._members: dict[int, list[int]] | None = None
        #: batch group of every image, for :func:`epoch_batches`: its network-input size (``by_size``:
        #: batches without padding — DINO is not padding-invariant: the input projection's GroupNorm and
        #: the convolutions near the border see the padding, so a model trained on padded batches and
        #: evaluated on single images, as the cache runs it, would see other features), else its
        #: orientation (0 = landscape or square, 1 = portrait)
        sizes = [self.transform.output_hw(int(im["height"]), int(im["width"])) for im in images]
        keys = sizes if by_size else [(int(h > w),) for h, w in sizes]
        index = {k: i for i, k in enumerate(sorted(set(keys)))}
        self.groups = [index[k] for k in keys]

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Tensor:
        """Preprocessed image [3, h, w] float32 (cached as float16).

        Raises:
            SkipImage: the file is unreadable, too large or not of the annotation file's size.
        """
        if index not in self._cache:
            info = self.images[index]
            path = self.image_dir / info["file_name"]
            pic = load_rgb(path)
            if (pic.height, pic.width) != (info["height"], info["width"]):
                raise SkipImage(
                    path,
                    f"image is {pic.width}x{pic.height} but the annotation file says {info['width']}x{info['height']}",
                )
            self._cache[index] = self.transform(pic).half()
        return self._cache[index].float()

    def _loadable(self, index: int) -> int:
        """``index``, or when its image cannot be loaded the next loadable image of its group (cyclically;
        reported once on stderr), so a batch keeps its size and its single input size."""
        if self._members is None:
            self._members = {}
            for j, g in enumerate(self.groups):
                self._members.setdefault(g, []).append(j)
        group = self._members[self.groups[index]]
        start = group.index(index)
        for k in range(len(group)):
            j = group[(start + k) % len(group)]
            if j in self.bad:
                continue
            try:
                self.image(j)
                return j
            except SkipImage as e:
                self.bad[j] = str(e)
                print(
                    f"mfdetr: skipped image id {self.images[j]['id']} ({e}); training uses the next image of "
                    f"its size in its place",
                    file=sys.stderr,
                )
        raise MfdetrError(
            f"no image of {self.image_dir} of input size group {self.groups[index]} can be loaded "
            f"(first: {self.bad.get(index, '')})"
        )

    def item(self, index: int, *, flip: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """``(image [3, h, w], target)`` of image ``index`` (see :meth:`_loadable` for an unreadable one),
        horizontally flipped when ``flip``."""
        index = self._loadable(index) if index in self.bad or index not in self._cache else index
        img = self.image(index)
        t = {k: v.clone() for k, v in self._targets[index].items()}
        if flip:
            img = img.flip(-1)
            t["boxes"][:, 0] = 1.0 - t["boxes"][:, 0]
        return img, t

    def batch(self, indices: Sequence[int], *, epoch: int = 0, seed: int = 0, hflip: float = 0.0) -> TrainBatch:
        """Pad the images ``indices`` (bottom/right zeros) with per-image flips from ``[seed, epoch, index]``."""
        items = [
            self.item(i, flip=hflip > 0 and np.random.default_rng([seed, epoch, i]).random() < hflip) for i in indices
        ]
        hp = max(int(x.shape[1]) for x, _ in items)
        wp = max(int(x.shape[2]) for x, _ in items)
        images = torch.zeros(len(items), 3, hp, wp)
        pad_mask = torch.ones(len(items), hp, wp, dtype=torch.bool)
        for b, (x, _) in enumerate(items):
            images[b, :, : x.shape[1], : x.shape[2]] = x
            pad_mask[b, : x.shape[1], : x.shape[2]] = False
        return TrainBatch(
            images=images,
            pad_mask=pad_mask,
            targets=[t for _, t in items],
            image_ids=[int(self.images[self._loadable(i)]["id"]) for i in indices],
        )


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The shuffled image order of ``epoch`` (a function of ``seed`` and ``epoch`` only)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(groups: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Batches of one epoch, each from a single group (same size or orientation): the shuffled order of
    :func:`epoch_order`, dealt into one bucket per group; a full bucket becomes the next batch.

    At least :func:`min_batches` batches; leftovers are dropped.
    """
    buckets: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for i in epoch_order(len(groups), seed=seed, epoch=epoch):
        b = buckets.setdefault(int(groups[i]), [])
        b.append(i)
        if len(b) == batch_size:
            out.append(b.copy())
            b.clear()
    return out


def min_batches(groups: Sequence[int], batch_size: int) -> int:
    """Batches :func:`epoch_batches` gives in every epoch, at least: ``n // batch_size − (G − 1)`` for
    ``G`` groups (each group's bucket keeps fewer than ``batch_size`` leftovers)."""
    return len(groups) // batch_size - (len(set(groups)) - 1)


__all__ = ["DetectionTrainSet", "TrainBatch", "epoch_batches", "epoch_order", "min_batches"]
