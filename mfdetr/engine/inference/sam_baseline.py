"""``mfdetr eval --baseline sam``: SAM prompted with a cache's detector boxes, next to a trained MaskNet.

Every cached image's top-K boxes (normalised cxcywh of the unpadded network input; the resize is uniform,
so times the original width/height they are the boxes in the original image) are clamped to the image
and given to SAM as box prompts, all K through one image embedding (``SamPredictor``: the image is set
once, ``predict_torch`` takes the K boxes, resized to SAM's input frame by its ``ResizeLongestSide``).
SAM's single-mask output (``multimask_output=False``) is thresholded at SAM's ``mask_threshold`` in the
original image and scored with the detector's class score c_i of its query, category = the query's
arg-max class (as the cached box AP scores the boxes).

A MaskNet checkpoint on the same cache is evaluated over the same images (one image per forward). The
latency is the warm mean per image (the first image is run once more before the clock starts) of what
each method adds to the detector: SAM's image encoder (with its resize and normalisation), its prompt
encoder + mask decoder (with the upsampling to the image), and the RLE encoding; MaskNet's forward and its
paste + RLE encoding. Reading the image file or the cache is not counted. On an accelerator every stage
ends with a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mfdetr.engine.damage import DamagePolicy, collate_marked
from mfdetr.engine.inference.latency import _Clock
from mfdetr.errors import MfdetrError, SkipImage

__all__ = [
    "BaselineJob",
    "MethodResult",
    "compare_on_cache",
    "format_comparison",
    "original_boxes",
    "run_baseline",
    "sam_image_masks",
]

SAM_STAGES = ("sam image encoder", "sam mask decoder", "postprocess")
MASKNET_STAGES = ("masknet", "postprocess")
_SMALL = ("boxes", "logits", "orig_hw")


@dataclass
class BaselineJob:
    """What ``mfdetr eval --baseline sam`` compares (see the module doc)."""

    cache: Path
    sam_checkpoint: Path
    sam_model: str = "vit_h"
    masknet: Path | None = None
    coco: Path | None = None
    annotations: Path | None = None
    images: Path | None = None  # the folder of the split's image files (default: the COCO split's)
    topk: int = 0  # boxes per image given to SAM (0: all cached)
    max_images: int = 0
    device: str = "auto"
    evaluator: str = "pycocotools"
    out: Path | None = None  # SAM's masks as a COCO results JSON
    sam_specs: Mapping[str, Any] | None = None  # model name → SamSpec (default: the published sizes)


@dataclass
class MethodResult:
    name: str
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]  # warm mean per image, by stage
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * sum(self.seconds.values())


def original_boxes(boxes_cxcywh: torch.Tensor, orig_hw: Sequence[int]) -> torch.Tensor:
    """[K, 4] cached boxes (normalised cxcywh) → absolute xyxy in the original image, clamped to it."""
    from mfdetr.ops.boxes import box_cxcywh_to_xyxy, clip_boxes

    h0, w0 = (float(v) for v in orig_hw)
    return clip_boxes(box_cxcywh_to_xyxy(boxes_cxcywh.float()) * torch.tensor([w0, h0, w0, h0]), (h0, w0))


def _detections(
    arrays: Mapping[str, np.ndarray], class_to_category: Sequence[int], known: set[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes xyxy original, class scores, category ids) of the queries of a known category, best first."""
    prob, slot = torch.from_numpy(np.asarray(arrays["logits"], dtype=np.float32)).sigmoid().max(dim=-1)
    cats = torch.as_tensor(list(class_to_category), dtype=torch.long)[slot]
    keep = torch.tensor([int(c) in known for c in cats.tolist()], dtype=torch.bool)
    order = torch.argsort(prob[keep], descending=True, stable=True)
    boxes = original_boxes(torch.from_numpy(np.asarray(arrays["boxes"], dtype=np.float32)), arrays["orig_hw"])
    return boxes[keep][order], prob[keep][order], cats[keep][order]


@torch.inference_mode()
def sam_image_masks(
    predictor: Any, image: np.ndarray, boxes_xyxy: torch.Tensor, clock: Callable[[str], None] = lambda stage: None
) -> torch.Tensor:
    """[K, H0, W0] bool: SAM's single mask for each box (original-image xyxy) on ``image`` (H0×W0×3 RGB uint8)."""
    predictor.set_image(image, "RGB")
    clock("sam image encoder")
    if len(boxes_xyxy) == 0:
        masks = torch.zeros(0, *image.shape[:2], dtype=torch.bool)
    else:
        prompts = predictor.transform.apply_boxes_torch(boxes_xyxy.to(predictor.device), image.shape[:2])
        masks = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)[0][:, 0]
    clock("sam mask decoder")
    return masks


def _load_image(path: Path, orig_hw: Sequence[int]) -> np.ndarray:
    from mfdetr.data import load_rgb

    try:
        image = load_rgb(path)
    except SkipImage as e:
        raise MfdetrError(e.reason, path=path) from None
    h0, w0 = (int(v) for v in orig_hw)
    if (image.height, image.width) != (h0, w0):
        raise MfdetrError(
            f"image is {image.width}x{image.height}, the cache recorded {w0}x{h0} for it (not the "
            "image the cache was written from; pass the right --images or --coco folder)",
            path=path,
        )
    return np.asarray(image)


def _sam_pass(
    job: BaselineJob,
    predictor: Any,
    store: Any,
    coco_split: Any,
    indices: Sequence[int],
    known: set[int],
    damage: DamagePolicy,
) -> tuple[list[dict], list[dict], list[int], dict[str, float]]:
    """SAM over the images ``indices`` of ``store``: (mask results, box results, image ids, mean seconds)."""
    from mfdetr.cache.verify import DamagedImage
    from mfdetr.evaluation import instances_to_results

    device = predictor.device
    c2c = store.manifest["category_map"]
    image_dir = Path(job.images) if job.images is not None else Path(coco_split.image_dir)
    totals = dict.fromkeys(SAM_STAGES, 0.0)
    masks_out: list[dict[str, Any]] = []
    boxes_out: list[dict[str, Any]] = []
    ids: list[int] = []
    for index in indices:
        try:
            arrays = store.read_arrays(int(index), list(_SMALL))
        except DamagedImage as e:
            if e.damage is None:
                raise
            damage.take([e.damage])
            continue
        iid = int(store.image_ids[index])
        image = _load_image(image_dir / coco_split.file_name(iid), arrays["orig_hw"])
        boxes, scores, cats = _detections(arrays, c2c, known)
        boxes_out.extend(instances_to_results(iid, cats, scores, boxes))
        top = slice(0, job.topk or None)
        if not ids:  # warm-up
            sam_image_masks(predictor, image, boxes[top])
        clock = _Clock(device, totals)
        masks = sam_image_masks(predictor, image, boxes[top], clock)
        masks_out.extend(instances_to_results(iid, cats[top], scores[top], boxes[top], masks))
        clock("postprocess")
        ids.append(iid)
    return masks_out, boxes_out, ids, {k: v / max(len(ids), 1) for k, v in totals.items()}


def _masknet_pass(
    model: torch.nn.Module,
    dataset: Any,
    manifest: Mapping[str, Any],
    known: set[int],
    device: torch.device,
    damage: DamagePolicy,
    max_images: int,
) -> tuple[list[dict], list[int], dict[str, float]]:
    """MaskNet over the dataset, one image per forward: (mask results, image ids, mean seconds per image)."""
    from mfdetr.masknet.postprocess import masks_to_coco_results

    model.eval().to(device)
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=1, shuffle=False, collate_fn=collate_marked)
    prepare = getattr(dataset, "prepare_batch", None)
    totals = dict.fromkeys(MASKNET_STAGES, 0.0)
    results: list[dict[str, Any]] = []
    ids: list[int] = []

    def run(det: Any, iid: int, clock: Callable[[str], None]) -> list[dict[str, Any]]:
        out = model(det)
        clock("masknet")
        mode = "mask_iou" if out.iou_pred is not None else "mask_prob"
        res = masks_to_coco_results(out, det, manifest["category_map"], [iid], score=mode)  # type: ignore[arg-type]
        clock("postprocess")
        return [r for r in res if r["category_id"] in known]

    with torch.inference_mode():
        for batch, damaged in loader:
            damage.take(damaged)
            if batch is None:
                continue
            batch = prepare(batch, device) if prepare is not None else batch.to(device)
            iid = int(batch.det.extras["image_id"][0])
            if not ids:  # warm-up
                run(batch.det, iid, lambda stage: None)
            results.extend(run(batch.det, iid, _Clock(device, totals)))
            ids.append(iid)
    return results, ids, {k: v / max(len(ids), 1) for k, v in totals.items()}


def _score(
    coco_gt: Any, results: list[dict[str, Any]], ids: set[int], iou_types: Sequence[str], evaluator: str
) -> dict[str, dict[str, float]]:
    from mfdetr.evaluation import CocoEvaluator

    ev = CocoEvaluator(coco_gt=coco_gt, iou_types=tuple(iou_types), evaluator=evaluator)
    ev.process([r for r in results if r["image_id"] in ids], image_ids=sorted(ids))
    return ev.finish()


def compare_on_cache(job: BaselineJob, damage: DamagePolicy | None = None) -> dict[str, Any]:
    """Evaluate SAM on ``job.cache``'s boxes (and ``job.masknet`` on the same images); write ``job.out``.

    Returns ``{"images", "device", "box": bbox metrics of the cached boxes, "methods": [MethodResult]}``.
    """
    from mfdetr.devices import resolve_device
    from mfdetr.engine.cache_data import open_annotations, open_cache
    from mfdetr.engine.inference.sam_model import import_sam, load_sam
    from mfdetr.engine.stage2 import CacheSources, masknet_on_cache
    from mfdetr.evaluation import coco_from_dict, write_results_json

    if job.topk < 0 or job.max_images < 0:
        raise MfdetrError(f"need --sam-topk >= 0 and --max-images >= 0, got {job.topk} and {job.max_images}")
    device = resolve_device(job.device)
    # the missing extra and unfit weights are reported before any work
    predictor = import_sam()[2](load_sam(job.sam_checkpoint, job.sam_model, device=device, specs=job.sam_specs))
    damage = damage or DamagePolicy()
    src = CacheSources(cache=job.cache, coco=job.coco, annotations=job.annotations)
    methods: list[MethodResult] = []
    model = ds = None
    if job.masknet is not None:
        model, ds, store = masknet_on_cache(src, checkpoint=job.masknet, damage=damage)
        coco_split = ds.coco
    else:
        store = open_cache(job.cache, role="evaluation cache")
        coco_split = open_annotations(store, coco=job.coco, annotations=job.annotations, with_targets=False)
    coco_gt = coco_from_dict(coco_split.annotations.data)
    known = set(coco_gt.getCatIds())
    if model is not None:
        res, mids, secs = _masknet_pass(model, ds, store.manifest, known, device, damage, job.max_images)
        methods.append(
            MethodResult(
                name=f"MaskNet {Path(job.masknet).parent.name or job.masknet}", metrics={}, seconds=secs, results=res
            )
        )
        indices = [store.index_of(i) for i in mids]
    else:
        indices = store.complete_indices().tolist()
        indices = indices[: job.max_images] if job.max_images > 0 else indices
    masks, boxes, sids, secs = _sam_pass(job, predictor, store, coco_split, indices, known, damage)
    methods.insert(0, MethodResult(name=f"SAM {job.sam_model} (box prompts)", metrics={}, seconds=secs, results=masks))
    ids = set(sids)
    for m in methods:
        m.metrics = _score(coco_gt, m.results, ids, ("segm", "boundary"), job.evaluator)
    box = _score(coco_gt, boxes, ids, ("bbox",), job.evaluator)["bbox"]
    if job.out is not None:
        write_results_json(job.out, [r for r in masks if r["image_id"] in ids])
    return {"images": len(ids), "device": str(device), "box": box, "methods": methods}


def format_comparison(report: Mapping[str, Any]) -> str:
    """One table: segm and Boundary AP and the warm ms/image of every method, then the stage breakdown."""
    methods: list[MethodResult] = report["methods"]
    width = max(len(m.name) for m in methods) + 2
    head = f"{'method':<{width}}{'segm AP':>8}{'AP50':>7}{'AP75':>7}{'APs':>7}{'APm':>7}{'APl':>7}"
    lines = [head + f"{'boundary AP':>12}{'ms/image':>10}"]
    for m in methods:
        s, b = m.metrics["segm"], m.metrics["boundary"]
        lines.append(
            f"{m.name:<{width}}{s['AP']:>8.2f}{s['AP50']:>7.2f}{s['AP75']:>7.2f}{s['APs']:>7.2f}"
            f"{s['APm']:>7.2f}{s['APl']:>7.2f}{b['AP']:>12.2f}{m.ms_per_image:>10.1f}"
        )
    lines.append(
        f"box AP of the cached detector boxes (both methods' prompts/inputs): {report['box']['AP']:.2f}; "
        f"{report['images']} images on {report['device']}"
    )
    for m in methods:
        parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in m.seconds.items())
        lines.append(f"{m.name} ms/image (warm, without the detector and the file/cache reads): {parts}")
    return "\n".join(lines)


def run_baseline(
    job: BaselineJob, *, baseline: str, skip_damaged: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """The ``mfdetr eval --baseline`` command: check the options, compare, print the table."""
    from mfdetr.outputs import check_output_file

    if baseline != "sam":
        raise MfdetrError(f"unknown --baseline {baseline!r} (choose from sam)")
    if job.cache is None or job.sam_checkpoint is None:
        raise MfdetrError("--baseline sam needs --cache DIR and --sam-checkpoint FILE (the SAM weights)")
    if job.out is not None:
        check_output_file(job.out)
    damage = DamagePolicy(skip=skip_damaged)
    report = compare_on_cache(job, damage)
    echo(format_comparison(report))
    if damage.skipped:
        echo(
            f"skipped damaged images: {len(damage.skipped)} (image ids "
            f"{', '.join(str(d.image_id) for d in damage.skipped)}); AP is over the others"
        )
    if job.out is not None:
        echo(f"results: {job.out}")
    return report
