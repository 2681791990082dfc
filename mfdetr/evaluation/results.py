"""COCO results files (the format is described in :mod:`mfdetr.evaluation`): reading and checking them
against the ground truth, writing them, and turning per-image predictions or the GT itself into them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools.coco import COCO

from mfdetr.data.masks import mask_to_rle
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write

if TYPE_CHECKING:  # torch stays unimported for eval-json
    from torch import Tensor

MASK_IOU_TYPES = ("segm", "boundary")  # the types that score the results' masks


# --- results files ---------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_results(
    results: Any, coco_gt: COCO, iou_types: Sequence[str], *, source: str = "results"
) -> list[dict[str, Any]]:
    """Check a results list against the GT: fields, types, known image/category ids, mask sizes.

    Raises:
        MfdetrError: naming ``source`` and the first bad entry.
    """
    if not isinstance(results, list):
        raise MfdetrError("results must be a JSON list of detections", path=source)
    cats = set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise MfdetrError(f"results[{i}] is not an object", path=source)
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise MfdetrError(f"results[{i}] has no '{key}'", path=source)
        iid = r["image_id"]
        if not isinstance(iid, int) or isinstance(iid, bool) or iid not in coco_gt.imgs:
            raise MfdetrError(f"results[{i}] has unknown image id {iid!r}", path=source)
        if r["category_id"] not in cats:
            raise MfdetrError(f"results[{i}] has unknown category id {r['category_id']!r}", path=source)
        if not _finite(r["score"]):
            raise MfdetrError(f"results[{i}] has a non-numeric score {r['score']!r}", path=source)
        if "bbox" in iou_types or "bbox" in r:
            bb = r.get("bbox")
            if not (isinstance(bb, list) and len(bb) == 4 and all(_finite(v) for v in bb)):
                raise MfdetrError(f"results[{i}] needs 'bbox' as [x, y, w, h] numbers", path=source)
        mask_types = [t for t in iou_types if t in MASK_IOU_TYPES]
        if mask_types:
            seg = r.get("segmentation")
            if not (isinstance(seg, dict) and isinstance(seg.get("counts"), str) and isinstance(seg.get("size"), list)):
                raise MfdetrError(
                    f"results[{i}] needs 'segmentation' as an RLE {{size, counts}} (for --iou-type {mask_types[0]})",
                    path=source,
                )
            img = coco_gt.imgs[iid]
            if seg["size"] != [img["height"], img["width"]]:
                raise MfdetrError(
                    f"results[{i}] mask size {seg['size']} differs from image {iid}'s "
                    f"[{img['height']}, {img['width']}]",
                    path=source,
                )
    return results


def read_results_json(path: str | Path, coco_gt: COCO, iou_types: Sequence[str]) -> list[dict[str, Any]]:
    """Read and validate a COCO results file (``MfdetrError`` naming the file on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise MfdetrError("results file not found", path=path)
    try:
        results = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MfdetrError(f"malformed results JSON ({e})", path=path) from None
    return validate_results(results, coco_gt, iou_types, source=str(path))


def write_results_json(path: str | Path, results: Iterable[Mapping[str, Any]]) -> Path:
    """Write detections in COCO results format (a JSON list; RLE counts as str)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for r in results:
        d: dict[str, Any] = {
            "image_id": int(r["image_id"]),
            "category_id": int(r["category_id"]),
            "score": float(r["score"]),
        }
        if "bbox" in r:
            d["bbox"] = [float(v) for v in r["bbox"]]
        if "segmentation" in r:
            seg = r["segmentation"]
            counts = seg["counts"]
            d["segmentation"] = {
                "size": [int(seg["size"][0]), int(seg["size"][1])],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
        out.append(d)
    text = json.dumps(out, separators=(",", ":")).encode()
    atomic_write(path, lambda f: f.write(text), what="results JSON")
    return path


# --- conversions -----------------------------------------------------------------------------------
def instances_to_results(
    image_id: int,
    category_ids: Tensor | Sequence[int],
    scores: Tensor | Sequence[float],
    boxes_xyxy: Tensor | np.ndarray | None = None,
    masks: Tensor | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per-image predictions → COCO result dicts.

    Args:
        category_ids: [N] COCO category ids; scores: [N].
        boxes_xyxy: [N, 4] absolute xyxy in the original image (converted to xywh), or ``None``.
        masks: [N, H0, W0] binary masks in the original image (→ RLE), or ``None``.
    """
    cats = [int(c) for c in (category_ids.tolist() if hasattr(category_ids, "tolist") else category_ids)]
    sc = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    out: list[dict[str, Any]] = [
        {"image_id": int(image_id), "category_id": c, "score": s} for c, s in zip(cats, sc, strict=True)
    ]
    if boxes_xyxy is not None:
        if hasattr(boxes_xyxy, "detach"):  # a torch Tensor
            boxes_xyxy = boxes_xyxy.detach().cpu().double().numpy()
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        for d, (x0, y0, x1, y1) in zip(out, b.tolist(), strict=True):
            d["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    if masks is not None and len(out):
        rles = mask_to_rle(masks)
        for d, rle in zip(out, rles if isinstance(rles, list) else [rles], strict=True):
            d["segmentation"] = rle
    return out


def gt_to_results(coco_gt: COCO, *, score: float = 1.0) -> list[dict[str, Any]]:
    """Turn the non-crowd GT annotations into perfect predictions (bbox + RLE), e.g. for tests."""
    out = []
    for ann in sorted(coco_gt.dataset["annotations"], key=lambda a: a["id"]):
        if ann.get("iscrowd", 0):
            continue
        rle = coco_gt.annToRLE(ann)
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": score,
                "bbox": [float(v) for v in ann["bbox"]],
                "segmentation": {
                    "size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"],
                },
            }
        )
    return out
