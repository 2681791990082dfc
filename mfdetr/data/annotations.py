"""Reading and validating a COCO instances annotation file (torch-free; shared by the dataset and eval)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfdetr.data.masks import clean_segmentation
from mfdetr.errors import MfdetrError


def annotation_path(root: str | Path, split: str) -> Path:
    """``root/annotations/instances_{split}.json``, checking that the COCO folder exists."""
    root = Path(root)
    if not root.is_dir():
        raise MfdetrError("COCO folder not found", path=root)
    return root / "annotations" / f"instances_{split}.json"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class AnnotationFile:
    """A validated COCO instances file: ``data`` with only usable annotations, the file's sha256, and
    the ignored annotations as ``(annotation id or "annotations[i]", reason)``."""

    path: Path
    data: dict[str, Any]
    sha256: str
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str | None:
        """One line summing up the ignored annotations (``None`` when none was)."""
        if not self.ignored:
            return None
        by_reason: dict[str, list[str]] = {}
        for ref, why in self.ignored:
            by_reason.setdefault(why, []).append(ref)
        parts = [
            f"{len(refs)} {why} ({', '.join(refs[:5])}{', …' if len(refs) > 5 else ''})"
            for why, refs in by_reason.items()
        ]
        total = len(self.ignored) + len(self.data["annotations"])
        return f"{self.path}: ignored {len(self.ignored)} of {total} annotations: {'; '.join(parts)}"


def _clean_annotation(a: dict[str, Any], image: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(usable annotation, None)`` (a copy where something was filled in or removed) or ``(None, why)``."""
    bbox = a.get("bbox")
    if not (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(_finite(v) for v in bbox)
        and bbox[2] > 0
        and bbox[3] > 0
    ):
        return None, "bbox not [x, y, w, h] with positive width and height"
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
        return None, "iscrowd not 0 or 1"
    if "area" in a and not (_finite(a["area"]) and a["area"] >= 0):
        return None, "area not a finite number >= 0"
    segm, why = clean_segmentation(a.get("segmentation"), int(image["height"]), int(image["width"]))
    if why is not None:
        return None, why
    if segm is a.get("segmentation") and "area" in a and "iscrowd" in a:
        return a, None
    out = {**a, "segmentation": segm, "iscrowd": int(crowd)}
    if "area" not in a:  # pycocotools needs it for the small/medium/large ranges: the mask's area
        from pycocotools import mask as mask_utils

        from mfdetr.data.masks import segmentation_to_rle

        out["area"] = float(mask_utils.area(segmentation_to_rle(segm, int(image["height"]), int(image["width"]))))
    return out, None


def _clean_annotations(
    data: dict[str, Any], path: Path, image_ids: dict[int, dict[str, Any]], cat_ids: set[int]
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The usable annotations and the ignored ones (see :func:`load_annotations`)."""
    kept: list[dict[str, Any]] = []
    ignored: list[tuple[str, str]] = []
    seen: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise MfdetrError(f"annotations[{i}] is not an object", path=path)
        ref = f"id {a['id']}" if _is_int(a.get("id")) else f"annotations[{i}]"
        if not _is_int(a.get("id")):
            ignored.append((ref, "no integer 'id'"))
            continue
        if a["id"] in seen:
            raise MfdetrError(f"duplicate annotation id {a['id']} (annotations[{i}])", path=path)
        seen.add(a["id"])
        if not (_is_int(a.get("image_id")) and _is_int(a.get("category_id"))):
            ignored.append((ref, "non-integer image_id or category_id"))
            continue
        if a["image_id"] not in image_ids:
            raise MfdetrError(
                f"annotations[{i}] points at unknown image id {a['image_id']!r} (annotation {ref})", path=path
            )
        if a["category_id"] not in cat_ids:
            raise MfdetrError(
                f"annotations[{i}] points at unknown category id {a['category_id']!r} (annotation {ref})", path=path
            )
        clean, why = _clean_annotation(a, image_ids[a["image_id"]])
        if clean is None:
            ignored.append((ref, str(why)))
        else:
            kept.append(clean)
    return kept, ignored


def load_annotations(path: str | Path, *, report: bool = True) -> AnnotationFile:
    """Read and validate a COCO instances JSON once, for training and evaluation alike.

    The file is unusable (:class:`MfdetrError` naming ``path`` and the first problem) unless it is a
    JSON object with ``images``/``annotations``/``categories`` lists, at least one image, every image
    with an integer unique ``id``, a ``file_name`` and positive integer ``height``/``width``, every
    category with an integer unique ``id``, annotation ids unique, and every annotation's integer
    ``image_id``/``category_id`` known.

    A single annotation that cannot be used is ignored (left out of ``data``, listed in ``ignored``,
    and with ``report`` summed up on stderr in one line): no integer ``id``, ``image_id`` or
    ``category_id``; a ``bbox`` that is not 4 finite numbers with positive width and height;
    ``iscrowd`` not 0/1; a negative or non-finite ``area``; no usable segmentation (see
    :func:`mfdetr.data.masks.clean_segmentation`: polygons with < 3 points, odd lengths or non-finite
    numbers; an RLE of another size or whose counts are negative, undecodable or do not sum to the
    image's pixel count). A kept annotation loses its degenerate polygon parts, gets ``iscrowd`` 0
    when it has none and its mask area when it has no ``area``. Evaluation feeds pycocotools exactly
    this ``data``.
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
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            raise MfdetrError(f"images[{i}] has no integer 'id'", path=path)
        if im["id"] in images:
            raise MfdetrError(f"duplicate image id {im['id']} (images[{i}])", path=path)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise MfdetrError(f"image id {im['id']} has no 'file_name'", path=path)
        if not (_is_int(im.get("height")) and _is_int(im.get("width")) and im["height"] > 0 and im["width"] > 0):
            raise MfdetrError(f"image id {im['id']} has no positive integer 'height'/'width'", path=path)
        images[im["id"]] = im
    cat_ids: set[int] = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise MfdetrError(f"categories[{i}] has no integer 'id'", path=path)
        if c["id"] in cat_ids:
            raise MfdetrError(f"duplicate category id {c['id']}", path=path)
        cat_ids.add(c["id"])
    kept, ignored = _clean_annotations(data, path, images, cat_ids)
    out = AnnotationFile(path=path, data={**data, "annotations": kept}, sha256=sha, ignored=ignored)
    line = out.report()
    if report and line:
        print(f"mfdetr: warning: {line}", file=sys.stderr)
    return out


def load_annotation_file(path: str | Path, *, report: bool = True) -> tuple[dict[str, Any], str]:
    """:func:`load_annotations` as ``(data with the usable annotations, sha256 of the file bytes)``."""
    f = load_annotations(path, report=report)
    return f.data, f.sha256
