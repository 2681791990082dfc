"""Evaluation of a mask network on a dataset of detector outputs (a cache, or a split seen through the
detector online): segm AP and Boundary AP of the masks (score eq. 13 with mask scoring, else eq. 2) and
box AP of the detector's boxes (scored by its class scores), over the same images; and a run's
validation record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mfdetr.engine.cache_data import CacheDataset
from mfdetr.outputs import atomic_write_text
from mfdetr.engine.config import RunConfig
from mfdetr.engine.damage import DamagePolicy, collate_marked
from mfdetr.engine.loading import loader_options


def box_results(det: Any, class_to_category: Sequence[int], image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The cached detector boxes as COCO ``bbox`` results (score = class score c_i)."""
    from mfdetr.masknet.targets import pred_boxes_original
    from mfdetr.ops.boxes import coco_bbox

    prob, slot = det.logits.float().sigmoid().max(dim=-1)
    cats = torch.as_tensor(list(class_to_category), dtype=torch.long, device=slot.device)[slot]
    boxes = pred_boxes_original(det)
    out = []
    for b, iid in enumerate(image_ids):
        xywh = coco_bbox(boxes[b].double(), det.orig_hw[b].tolist()).tolist()
        for k in torch.nonzero(cats[b] > 0).flatten().tolist():
            out.append(
                {"image_id": int(iid), "category_id": int(cats[b, k]), "score": float(prob[b, k]), "bbox": xywh[k]}
            )
    return out


@torch.no_grad()
def evaluate_masknet(
    model: nn.Module,
    dataset: CacheDataset,
    *,
    manifest: Mapping[str, Any],
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: str = "off",
    score: str | None = None,
    damage: DamagePolicy | None = None,
    evaluator: str = "pycocotools",
    category_ap: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Segm AP and Boundary AP of MaskNet's masks and box AP of the cached boxes over ``dataset``'s images.

    A damaged cache image stops the evaluation (:class:`~mfdetr.cache.verify.DamagedImage`) unless
    ``damage`` skips it: the AP is then over the intact images, and ``damage`` lists the others.
    ``evaluator`` scores segm/bbox (:func:`mfdetr.evaluation.evaluate`; boundary always uses faster-coco-eval).
    ``category_ap``, when given, is filled with each GT category's name and AP per IoU type.
    Returns ``({"segm": {AP, ...}, "boundary": {...}, "bbox": {...}}, segm results)`` (COCO format, RLE masks).
    """
    damage = damage or DamagePolicy()
    from mfdetr.evaluation import CocoEvaluator, category_rows, coco_from_dict
    from mfdetr.masknet.postprocess import masks_to_coco_results

    device = torch.device(device)
    model.eval().to(device)
    c2c = manifest["category_map"]
    coco_gt = coco_from_dict(_annotation_dict(dataset))
    segm_ev = CocoEvaluator(coco_gt=coco_gt, iou_types=("segm", "boundary"), evaluator=evaluator)
    box_ev = CocoEvaluator(coco_gt=coco_gt, iou_types=("bbox",), evaluator=evaluator)
    known = set(coco_gt.getCatIds())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_marked,
        pin_memory=device.type == "cuda",
        **loader_options(num_workers),
    )
    use_amp = device.type == "cuda" and amp != "off"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    all_results: list[dict[str, Any]] = []
    prepare = getattr(dataset, "prepare_batch", None)  # a --c1 recompute cache: C1 from the images
    for batch, damaged in loader:
        damage.take(damaged)
        if batch is None:
            continue
        batch = prepare(batch, device) if prepare is not None else batch.to(device)
        det = batch.det
        ids = [int(i) for i in det.extras["image_id"]]
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            out = model(det)
        mode = score or ("mask_iou" if out.iou_pred is not None else "mask_prob")  # eq. 13, else eq. 2
        res = masks_to_coco_results(out, det, c2c, ids, score=mode)  # type: ignore[arg-type]
        # a detector head may know categories the annotation file does not list: those cannot be scored
        res = [r for r in res if r["category_id"] in known]
        segm_ev.process(res, image_ids=ids)
        box_ev.process([r for r in box_results(det, c2c, ids) if r["category_id"] in known], image_ids=ids)
        all_results.extend(res)
    metrics = {**segm_ev.finish(), **box_ev.finish()}
    if category_ap is not None:
        category_ap.update(category_rows(coco_gt, segm_ev, box_ev))
    return metrics, all_results


def evaluate_and_record(
    model: nn.Module,
    dataset: Any,
    *,
    manifest: Mapping[str, Any],
    cfg: RunConfig,
    out: Path,
    step: int,
    device: torch.device | str,
    damage: DamagePolicy | None = None,
) -> dict[str, dict[str, float]]:
    """A run's validation: :func:`evaluate_masknet`, then ``out/val_results.json`` and
    ``out/val_metrics.json`` (with the step, and the image ids of damaged images skipped, if any);
    returns the metrics."""
    from mfdetr.evaluation import write_results_json

    m, results = evaluate_masknet(
        model,
        dataset,
        manifest=manifest,
        batch_size=cfg.train.batch_size,
        device=device,
        amp=cfg.train.amp,
        damage=damage,
    )
    write_results_json(out / "val_results.json", results)
    store = getattr(getattr(dataset, "store", None), "path", None)
    skipped = [d.image_id for d in damage.skipped_in(store)] if damage is not None and store is not None else []
    extra = {"skipped_damaged_image_ids": skipped} if skipped else {}
    atomic_write_text(out / "val_metrics.json", json.dumps({"step": step, **m, **extra}, indent=2) + "\n")
    return m


def _annotation_dict(dataset: CacheDataset) -> dict[str, Any]:
    """The GT of the dataset's split as parsed once when it was opened (usable annotations only)."""
    return dataset.coco.annotations.data


def flat_metrics(m: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One run's metrics as a flat row (segm AP as ``AP``…, ``boundary_AP``…, ``box_AP``…) for metrics.jsonl."""
    return {
        **m["segm"],
        **{f"boundary_{k}": v for k, v in m.get("boundary", {}).items()},
        **{f"box_{k}": v for k, v in m["bbox"].items()},
    }


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    from mfdetr.evaluation import format_table

    return format_table(metrics)


__all__ = ["box_results", "evaluate_and_record", "evaluate_masknet", "flat_metrics", "format_metrics"]
