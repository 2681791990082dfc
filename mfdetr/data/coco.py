"""A COCO instance-segmentation folder as a torch ``Dataset`` (images + GT instances).

Layout (the official one; every command taking ``--coco DIR`` reads it)::

    DIR/{split}/                          images, e.g. DIR/val2017/000000000139.jpg
    DIR/annotations/instances_{split}.json

The layout and the annotation JSON are validated up front (:class:`mfdetr.errors.MfdetrError` naming
the file and the problem). A single bad image (missing, corrupt, truncated, wrong size) raises
:class:`mfdetr.errors.SkipImage` from ``__getitem__``; :mod:`mfdetr.data.collate` turns those into
recorded skips for a run over a split.
"""

from __future__ import annotations

import hashlib
import json
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_annotation_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read and validate a COCO instances JSON; return ``(data, sha256 of the file bytes)``.

    Checks: valid JSON object with ``images``/``annotations``/``categories`` lists; every image has an
    integer unique ``id``, a ``file_name`` and positive ``height``/``width``; every category an integer
    unique ``id``; every annotation an ``image_id`` and ``category_id`` that exist. At least one image.

    Raises:
        MfdetrError: naming ``path`` and the first problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise MfdetrError("annotation file not found", path=path)
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MfdetrError(f"malformed annotations JSON ({e})", path=path) from None
    if not isinstance(data, dict):
        raise MfdetrError("annotations JSON must be an object with images/annotations/categories", path=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise MfdetrError(f"annotations JSON has no '{key}' list", path=path)
    if not data["images"]:
        raise MfdetrError("empty split: the annotation file lists no images", path=path)
    image_ids: set[int] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise MfdetrError(f"images[{i}] has no integer 'id'", path=path)
        if im["id"] in image_ids:
            raise MfdetrError(f"duplicate image id {im['id']} (images[{i}])", path=path)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise MfdetrError(f"image id {im['id']} has no 'file_name'", path=path)
        if not (_is_int(im.get("height")) and _is_int(im.get("width")) and im["height"] > 0 and im["width"] > 0):
            raise MfdetrError(f"image id {im['id']} has no positive integer 'height'/'width'", path=path)
        image_ids.add(im["id"])
    cat_ids: set[int] = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise MfdetrError(f"categories[{i}] has no integer 'id'", path=path)
        if c["id"] in cat_ids:
            raise MfdetrError(f"duplicate category id {c['id']}", path=path)
        cat_ids.add(c["id"])
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise MfdetrError(f"annotations[{i}] is not an object", path=path)
        if a.get("image_id") not in image_ids or not _is_int(a.get("image_id")):
            raise MfdetrError(f"annotations[{i}] points at unknown image id {a.get('image_id')!r}", path=path)
        if a.get("category_id") not in cat_ids or not _is_int(a.get("category_id")):
            raise MfdetrError(f"annotations[{i}] points at unknown category id {a.get('category_id')!r}",
                              path=path)
    return data, sha


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
    Targets: ``labels`` are COCO category ids; instances whose segmentation is degenerate (polygons of
    < 3 points, an empty mask, an RLE of the wrong size) or whose ``bbox`` has zero width/height are
    ignored; boxes are the tight boxes of the decoded masks.
    """

    def __init__(self, root: str | Path, split: str, *, preprocessing: Preprocessing | None = None,
                 with_targets: bool = True, annotation_file: str | Path | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise MfdetrError("COCO folder not found", path=self.root)
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise MfdetrError(f"split folder not found (expected the images of split '{split}' there)",
                              path=self.image_dir)
        self.annotation_file = Path(annotation_file) if annotation_file is not None else (
            self.root / "annotations" / f"instances_{split}.json")
        data, self.annotation_sha256 = load_annotation_file(self.annotation_file)
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
        return GTInstances(boxes=masks_to_boxes_xyxy(masks), labels=torch.tensor(labels, dtype=torch.int64),
                           masks=masks, iscrowd=torch.tensor(crowd, dtype=torch.bool), image_id=image_id,
                           orig_hw=(h, w))

    def __getitem__(self, index: int) -> CocoItem:
        image_id = self.image_ids[index]
        path = self.image_path(image_id)
        image = load_rgb(path)
        info = self._images[image_id]
        if (image.height, image.width) != (info["height"], info["width"]):
            raise SkipImage(path, f"image is {image.width}x{image.height} but the annotation file says "
                                  f"{info['width']}x{info['height']}")
        x = self.transform(image)
        target = self.load_targets(image_id) if self.with_targets else None
        return CocoItem(image=x, image_id=image_id, file_name=self.file_name(image_id),
                        orig_hw=(image.height, image.width), input_hw=(int(x.shape[1]), int(x.shape[2])),
                        target=target)
