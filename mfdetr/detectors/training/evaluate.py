"""Box AP of a detector on a COCO split (official post-processing → pycocotools ``bbox`` COCOeval)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mfdetr.data import CocoInstances, collate
from mfdetr.detectors.common.frozen import FrozenDetr

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_results(model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8,
                          max_images: int = 0) -> tuple[list[dict[str, Any]], list[int], Path]:
    """Run ``model.predict`` over the split; COCO result dicts (xywh boxes), the image ids, the GT file."""
    ds = CocoInstances(root, split, preprocessing=model.preset.preprocessing, with_targets=False)
    n = len(ds) if max_images <= 0 else min(max_images, len(ds))
    results: list[dict[str, Any]] = []
    ids: list[int] = []
    for start in range(0, n, batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, n))])
        for image_id, det in zip(batch.image_ids, model.predict(batch), strict=True):
            ids.append(int(image_id))
            b = det.boxes.double().tolist()
            for s, c, (x0, y0, x1, y1) in zip(det.scores.tolist(), det.category_ids.tolist(), b, strict=True):
                results.append({"image_id": int(image_id), "category_id": int(c), "score": float(s),
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return results, ids, ds.annotation_file


def box_ap(model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8,
           max_images: int = 0) -> dict[str, float]:
    """``{AP, AP50, AP75, APs, APm, APl}`` in percent (``nan`` where a size range has no GT) on the
    first ``max_images`` images of ``split`` (all when 0). The model is put in ``eval()`` and restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            results, ids, ann_file = detections_to_results(model, root, split, batch_size=batch_size,
                                                           max_images=max_images)
    finally:
        model.train(was_training)
    if not results:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = sorted(ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: float(ev.stats[k] * 100.0) if ev.stats[k] >= 0 else float("nan") for k, m in enumerate(METRICS)}


__all__ = ["METRICS", "box_ap", "detections_to_results"]
