"""Box AP of a detector on a COCO split: official post-processing (``FrozenDetr.predict``) →
:mod:`mfdetr.evaluation` (pycocotools ``bbox`` COCOeval over the images run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from mfdetr.data import CocoInstances, iterate_batches, run_or_skip
from mfdetr.data.batching import same_size_batches
from mfdetr.detectors.common.frozen import FrozenDetr
from mfdetr.evaluation import METRIC_NAMES, coco_from_dict, evaluate, instances_to_results


def detections_to_results(
    model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8, max_images: int = 0
) -> tuple[list[dict[str, Any]], list[int], CocoInstances]:
    """Run ``model.predict`` over the first ``max_images`` images of the split (all when 0), batching
    only images of one input size: COCO result dicts (xywh boxes, category ids), the image ids run,
    the split (its parsed annotations). Unreadable images and images the detector cannot process are
    reported on stderr and left out."""
    ds = CocoInstances(root, split, preprocessing=model.preset.preprocessing, with_targets=False)
    n = len(ds) if max_images <= 0 else min(max_images, len(ds))
    results: list[dict[str, Any]] = []
    ids: list[int] = []
    # no padding: each image as if alone
    for batch, skips in iterate_batches(ds, batches=same_size_batches(ds, range(n), batch_size)):
        for s in skips:
            print(f"mfdetr: skipped image id {s.image_id}: {s.reason}", file=sys.stderr)
        if batch is None:
            continue
        done, failed = run_or_skip(model.predict, batch)  # an image the detector cannot process: reported
        for pos, reason in failed:
            print(f"mfdetr: skipped image id {batch.image_ids[pos]}: {reason}", file=sys.stderr)
        for part, dets in done:
            for image_id, det in zip(part.image_ids, dets, strict=True):
                ids.append(int(image_id))
                results += instances_to_results(int(image_id), det.category_ids, det.scores, boxes_xyxy=det.boxes)
    return results, ids, ds


def box_ap(
    model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8, max_images: int = 0
) -> dict[str, float]:
    """``{AP, AP50, AP75, APs, APm, APl}`` in percent (``nan`` where a size range has no GT) over the
    first ``max_images`` images of ``split`` (all when 0). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            results, ids, ds = detections_to_results(model, root, split, batch_size=batch_size, max_images=max_images)
    finally:
        model.train(was_training)
    if not ids:  # every image skipped: nothing was scored
        return dict.fromkeys(METRIC_NAMES, float("nan"))
    return evaluate(coco_from_dict(ds.annotations.data), results, "bbox", image_ids=ids)


__all__ = ["box_ap", "detections_to_results"]
