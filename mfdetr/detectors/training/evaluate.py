"""Box AP of a detector on a COCO split: official post-processing (``FrozenDetr.predict``) →
:mod:`mfdetr.evaluation` (pycocotools ``bbox`` COCOeval over the images run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mfdetr.data import CocoInstances, collate
from mfdetr.data.batching import same_size_batches
from mfdetr.detectors.common.frozen import FrozenDetr
from mfdetr.evaluation import evaluate, instances_to_results, load_coco_gt


def detections_to_results(model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8,
                          max_images: int = 0) -> tuple[list[dict[str, Any]], list[int], Path]:
    """Run ``model.predict`` over the first ``max_images`` images of the split (all when 0), batching
    only images of one input size: COCO result dicts (xywh boxes, category ids), the image ids run,
    the annotation file."""
    ds = CocoInstances(root, split, preprocessing=model.preset.preprocessing, with_targets=False)
    n = len(ds) if max_images <= 0 else min(max_images, len(ds))
    results: list[dict[str, Any]] = []
    ids: list[int] = []
    for chunk in same_size_batches(ds, range(n), batch_size):  # no padding: each image as if alone
        batch = collate([ds[i] for i in chunk])
        for image_id, det in zip(batch.image_ids, model.predict(batch), strict=True):
            ids.append(int(image_id))
            results += instances_to_results(int(image_id), det.category_ids, det.scores, boxes_xyxy=det.boxes)
    return results, ids, ds.annotation_file


def box_ap(model: FrozenDetr, root: str | Path, split: str, *, batch_size: int = 8,
           max_images: int = 0) -> dict[str, float]:
    """``{AP, AP50, AP75, APs, APm, APl}`` in percent (``nan`` where a size range has no GT) over the
    first ``max_images`` images of ``split`` (all when 0). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            results, ids, ann_file = detections_to_results(model, root, split, batch_size=batch_size,
                                                           max_images=max_images)
    finally:
        model.train(was_training)
    return evaluate(load_coco_gt(ann_file), results, "bbox", image_ids=ids)


__all__ = ["box_ap", "detections_to_results"]
