"""A COCO instance-segmentation folder as a torch ``Dataset`` (images + GT instances).

Layout (the official one; every command taking ``--coco DIR`` reads it)::

    DIR/{split}/                          images, e.g. DIR/val2017/000000000139.jpg
    DIR/annotations/instances_{split}.json

The layout and the annotation JSON are validated up front (:class:`mfdetr.errors.MfdetrError` naming
the file and the problem). A single bad image (missing, corrupt, truncated, wrong size) raises
:class:`mfdetr.errors.SkipImage` from ``__getitem__``; :mod:`mfdetr.data.batching` turns those into
recorded skips for a run over a split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from mfdetr.contracts import GTInstances, Preprocessing
from mfdetr.data.annotations import AnnotationFile, load_annotations
from mfdetr.data.images import load_rgb
from mfdetr.data.masks import decode_rles, masks_to_boxes_xyxy, segmentation_to_rle
from mfdetr.data.transforms import EvalTransform
from mfdetr.errors import MfdetrError, SkipImage


@dataclass
class CocoItem:
    """One preprocessed image.

    - ``image`` [3, oh, ow] float32, normalised (``input_hw = (oh, ow)``).
    - ``orig_hw`` (H0, W0) original size; ``target`` GT instances in the original frame, or ``None``
      when the dataset was built with ``with_targets=False``.
    """

    image: Tensor
    image_id: int
    file_name: str
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]
    target: GTInstances | None


def _degenerate_bbox(bbox: Any) -> bool:
    """A COCO ``bbox`` [x, y, w, h] with non-positive width or height (or malformed)."""
    if bbox is None:
        return False
    try:
        return not (len(bbox) == 4 and float(bbox[2]) > 0 and float(bbox[3]) > 0)
    except (TypeError, ValueError):
        return True


class CocoInstances(Dataset[CocoItem]):
    """COCO instance-segmentation split as preprocessed images + :class:`GTInstances`.

    Args:
        root: the COCO folder (``root/{split}/`` images, ``root/annotations/instances_{split}.json``).
        split: e.g. ``"val2017"``.
        preprocessing: resize/normalise parameters (a detector preset's); default S=800, M=1333.
        with_targets: decode GT masks (set ``False`` to load images only).
        annotation_file: override the annotation path.

    Items are :class:`CocoItem`; ``__getitem__`` raises :class:`SkipImage` for a bad image file.
    Targets: ``labels`` are COCO category ids; the annotation file is read once by
    :func:`mfdetr.data.annotations.load_annotations`, which leaves out (and reports) annotations that
    cannot be used (degenerate polygons, damaged RLE, boxes without area, non-integer ids); instances
    whose mask is empty are ignored too; boxes are the tight boxes of the decoded masks.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        preprocessing: Preprocessing | None = None,
        with_targets: bool = True,
        annotation_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise MfdetrError("COCO folder not found", path=self.root)
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise MfdetrError(
                f"split folder not found (expected the images of split '{split}' there)", path=self.image_dir
            )
        self.annotation_file = (
            Path(annotation_file)
            if annotation_file is not None
            else (self.root / "annotations" / f"instances_{split}.json")
        )
        #: the parsed file (only its usable annotations); evaluation builds its pycocotools GT from it
        self.annotations: AnnotationFile = load_annotations(self.annotation_file)
        self.annotation_sha256 = self.annotations.sha256
        data = self.annotations.data
        self.preprocessing = preprocessing or Preprocessing()
        self.transform = EvalTransform(preprocessing=self.preprocessing)
        self.with_targets = with_targets
        self.categories: list[dict[str, Any]] = sorted(data["categories"], key=lambda c: c["id"])
        images = sorted(data["images"], key=lambda im: im["id"])
        self.image_ids: list[int] = [im["id"] for im in images]
        self._images: dict[int, dict[str, Any]] = {im["id"]: im for im in images}
        self._index = {iid: i for i, iid in enumerate(self.image_ids)}
        self._anns: dict[int, list[Mapping[str, Any]]] = {}
        if with_targets:
            for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
                self._anns.setdefault(a["image_id"], []).append(a)

    # --- metadata ---------------------------------------------------------------------------------
    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, image_id: int) -> dict[str, Any]:
        return self._images[image_id]

    def file_name(self, image_id: int) -> str:
        return str(self._images[image_id]["file_name"])

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.file_name(image_id)

    def index_of(self, image_id: int) -> int:
        return self._index[image_id]

    # --- loading ----------------------------------------------------------------------------------
    def load_targets(self, image_id: int) -> GTInstances:
        """GT instances of one image in its original pixel frame (see class doc for what is ignored)."""
        info = self._images[image_id]
        h, w = int(info["height"]), int(info["width"])
        rles, labels, crowd = [], [], []
        for a in self._anns.get(image_id, []):
            if _degenerate_bbox(a.get("bbox")):
                continue
            rle = segmentation_to_rle(a.get("segmentation"), h, w)
            if rle is None or float(mask_utils.area(rle)) <= 0:
                continue
            rles.append(rle)
            labels.append(int(a["category_id"]))
            crowd.append(bool(a.get("iscrowd", 0)))
        if rles:
            masks = torch.from_numpy(np.ascontiguousarray(decode_rles(rles).transpose(2, 0, 1))).bool()
        else:
            masks = torch.zeros(0, h, w, dtype=torch.bool)
        return GTInstances(
            boxes=masks_to_boxes_xyxy(masks),
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=masks,
            iscrowd=torch.tensor(crowd, dtype=torch.bool),
            image_id=image_id,
            orig_hw=(h, w),
        )

    def __getitem__(self, index: int) -> CocoItem:
        image_id = self.image_ids[index]
        path = self.image_path(image_id)
        image = load_rgb(path)
        info = self._images[image_id]
        if (image.height, image.width) != (info["height"], info["width"]):
            raise SkipImage(
                path,
                f"image is {image.width}x{image.height} but the annotation file says {info['width']}x{info['height']}",
            )
        x = self.transform(image)
        target = self.load_targets(image_id) if self.with_targets else None
        return CocoItem(
            image=x,
            image_id=image_id,
            file_name=self.file_name(image_id),
            orig_hw=(image.height, image.width),
            input_hw=(int(x.shape[1]), int(x.shape[2])),
            target=target,
        )
