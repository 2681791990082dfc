"""Reading and validating a COCO instances annotation file (torch-free; shared by the dataset and eval)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError


def annotation_path(root: str | Path, split: str) -> Path:
    """``root/annotations/instances_{split}.json``, checking that the COCO folder exists."""
    root = Path(root)
    if not root.is_dir():
        raise MfdetrError("COCO folder not found", path=root)
    return root / "annotations" / f"instances_{split}.json"


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
        if not _is_int(a.get("image_id")) or a["image_id"] not in image_ids:
            raise MfdetrError(f"annotations[{i}] points at unknown image id {a.get('image_id')!r}", path=path)
        if not _is_int(a.get("category_id")) or a["category_id"] not in cat_ids:
            raise MfdetrError(f"annotations[{i}] points at unknown category id {a.get('category_id')!r}",
                              path=path)
    return data, sha
