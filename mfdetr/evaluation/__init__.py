"""COCO evaluation (``segm``, ``bbox`` and ``boundary``): results files, metrics, a streaming evaluator.

Predictions use COCO's results format (what the test-dev server accepts), one dict per detection::

    {"image_id": int, "category_id": int, "score": float,
     "bbox": [x, y, w, h],                                   # absolute pixels, original image
     "segmentation": {"size": [H, W], "counts": str}}       # compressed RLE of the binary mask

Metrics are pycocotools' ``COCOeval`` stats in percent: AP (IoU .50:.95), AP50, AP75, APs, APm, APl.
An area range with no ground truth gives ``nan`` (pycocotools' ``-1``), as detectron2 reports it; no
predictions at all gives zeros. For ``segm``, the ``bbox`` field is dropped before ``loadRes`` so that
the detections' small/medium/large areas are mask areas (detectron2 / mmdetection do the same; with a
box present pycocotools would use the box area — AP, AP50 and AP75 are unaffected either way).
pycocotools' prints are silenced unless ``verbose``.

``boundary`` is Boundary AP (Cheng et al. 2021) as faster-coco-eval computes it: a mask's boundary is the
mask minus its erosion by d = max(1, round(0.02 · image diagonal)) pixels (a 3×3 kernel applied d times,
zero outside the image, so a mask cut by the image border has a boundary there), and a detection matches
a GT at the IoU min(mask IoU, boundary IoU) (crowd GT: the mask IoU). ``segm`` and ``bbox`` use
pycocotools unless ``evaluator="faster"`` asks for faster-coco-eval's ``COCOeval_faster``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mfdetr.data.annotations import annotation_path, load_annotation_file
from mfdetr.data.masks import mask_to_rle
from mfdetr.errors import MfdetrError

# results files and conversions to them, re-exported
from mfdetr.evaluation.results import MASK_IOU_TYPES as MASK_IOU_TYPES
from mfdetr.evaluation.results import gt_to_results as gt_to_results
from mfdetr.evaluation.results import instances_to_results as instances_to_results
from mfdetr.evaluation.results import read_results_json as read_results_json
from mfdetr.evaluation.results import validate_results as validate_results
from mfdetr.evaluation.results import write_results_json as write_results_json

IOU_TYPES = ("segm", "bbox", "boundary")
EVALUATORS = ("pycocotools", "faster")
BOUNDARY_DILATION_RATIO = 0.02  # the boundary band, as a fraction of the image diagonal
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

__all__ = [
    "BOUNDARY_DILATION_RATIO",
    "EVALUATORS",
    "IOU_TYPES",
    "MASK_IOU_TYPES",
    "METRIC_NAMES",
    "CocoEvaluator",
    "annotation_path",
    "category_ap",
    "category_rows",
    "coco_from_dict",
    "evaluate",
    "format_category_table",
    "format_table",
    "gt_to_results",
    "instances_to_results",
    "load_coco_gt",
    "mask_to_rle",
    "read_results_json",
    "validate_results",
    "write_results_json",
]


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def coco_from_dict(data: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over an in-memory annotation dict (indexed silently).

    Each annotation is copied (shallowly): ``COCOeval`` rewrites the GT's segmentations and flags in
    place, and ``data`` may be a dataset's own annotations (see
    :func:`mfdetr.data.annotations.load_annotations`, which gives the usable annotations to feed here).
    """
    coco = COCO()
    coco.dataset = {**data, "annotations": [dict(a) for a in data.get("annotations", [])]}
    with _quiet(False):
        coco.createIndex()
    return coco


def load_coco_gt(annotation_file: str | Path) -> COCO:
    """Validate (see :func:`mfdetr.data.load_annotations`: unusable annotations are left out and
    reported once) and index a COCO annotation file."""
    data, _ = load_annotation_file(annotation_file)
    return coco_from_dict(data)


# --- evaluation ------------------------------------------------------------------------------------
def _check_choice(iou_type: str, evaluator: str) -> None:
    if iou_type not in IOU_TYPES:
        raise MfdetrError(f"unknown iou type {iou_type!r} (choose from {', '.join(IOU_TYPES)})")
    if evaluator not in EVALUATORS:
        raise MfdetrError(f"unknown evaluator {evaluator!r} (choose from {', '.join(EVALUATORS)})")


def _faster_cocoeval(coco_gt: COCO, dets: list[dict[str, Any]], iou_type: str, verbose: bool) -> Any:
    """faster-coco-eval's ``COCOeval_faster`` over the same GT dict as ``coco_gt`` (not yet run)."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    say = print if verbose else (lambda *a, **k: None)
    gt = FasterCOCO(print_function=say)
    # it stores each annotation's RLE and boundary in the dict it is given: copies keep coco_gt's own
    gt.dataset = {**coco_gt.dataset, "annotations": [dict(a) for a in coco_gt.dataset.get("annotations", [])]}
    gt.createIndex()
    dt = gt.loadRes(dets)
    return COCOeval_faster(gt, dt, iou_type, print_function=say, boundary_dilation_ratio=BOUNDARY_DILATION_RATIO)


def category_ap(ev: Any) -> dict[int, float]:
    """AP (IoU .50:.95, all areas, 100 detections) of each category of an accumulated COCOeval, in
    percent (``nan`` for a category without GT in the evaluated images)."""
    prec = np.asarray(ev.eval["precision"])  # [IoU thresholds, recalls, categories, areas, max dets]
    out: dict[int, float] = {}
    for k, cid in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cid)] = float(p.mean() * 100.0) if p.size else float("nan")
    return out


def evaluate(
    coco_gt: COCO,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    *,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
    evaluator: str = "pycocotools",
    per_category: dict[int, float] | None = None,
) -> dict[str, float]:
    """COCO evaluation of ``results`` → ``{AP, AP50, AP75, APs, APm, APl}`` in percent.

    Args:
        iou_type: ``segm``, ``bbox`` or ``boundary`` (always faster-coco-eval: pycocotools has none).
        image_ids: evaluate on these images only (default: every image of ``coco_gt``).
        verbose: let the evaluator print its summary.
        evaluator: ``pycocotools`` (default) or ``faster`` (faster-coco-eval) for ``segm``/``bbox``.
        per_category: filled with each GT category's AP (:func:`category_ap`) when given.
    """
    _check_choice(iou_type, evaluator)
    if not results:
        if per_category is not None:
            per_category.update(dict.fromkeys(coco_gt.getCatIds(), 0.0))
        return dict.fromkeys(METRIC_NAMES, 0.0)
    dets = copy.deepcopy(list(results))
    if iou_type in MASK_IOU_TYPES:
        for d in dets:
            d.pop("bbox", None)  # mask areas for the detections' size ranges (module doc)
    with _quiet(verbose):
        if iou_type == "boundary" or evaluator == "faster":
            ev = _faster_cocoeval(coco_gt, dets, iou_type, verbose)
        else:
            ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if per_category is not None:
        per_category.update(category_ap(ev))
    return {
        name: float(ev.stats[k] * 100.0) if ev.stats[k] >= 0 else float("nan") for k, name in enumerate(METRIC_NAMES)
    }


class CocoEvaluator:
    """Streaming COCO evaluation: :meth:`reset`, :meth:`process` per batch, :meth:`finish`.

    Args:
        coco_gt: the ground truth (see :func:`load_coco_gt`).
        iou_types: which of ``"segm"``, ``"bbox"``, ``"boundary"`` to evaluate.
        all_images: evaluate over every GT image; by default only over the images passed to
            :meth:`process` (so a partial run is scored on what it saw; images without detections
            must be announced through ``image_ids``).
        verbose: let the evaluator print.
        evaluator: ``pycocotools`` or ``faster`` for ``segm``/``bbox`` (see :func:`evaluate`).

    After :meth:`finish`, ``category_ap[iou_type]`` holds each category's AP (:func:`category_ap`).
    """

    def __init__(
        self,
        *,
        coco_gt: COCO,
        iou_types: Sequence[str] = ("segm", "bbox"),
        all_images: bool = False,
        verbose: bool = False,
        evaluator: str = "pycocotools",
    ) -> None:
        for t in iou_types:
            _check_choice(t, evaluator)
        self.coco_gt = coco_gt
        self.evaluator = evaluator
        self.iou_types = tuple(iou_types)
        self.all_images = all_images
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        self.category_ap: dict[str, dict[int, float]] = {}
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def process(self, predictions: Iterable[Mapping[str, Any]], *, image_ids: Iterable[int] = ()) -> None:
        """Add COCO result dicts (e.g. from :func:`instances_to_results`) and the images they cover."""
        preds = [dict(p) for p in predictions]
        for p in preds:
            seg = p.get("segmentation")
            if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
                p["segmentation"] = {"size": list(seg["size"]), "counts": seg["counts"].decode("ascii")}
        self.results.extend(preds)
        self.image_ids.update(int(i) for i in image_ids)
        self.image_ids.update(int(p["image_id"]) for p in preds)

    def finish(self) -> dict[str, dict[str, float]]:
        """``{iou_type: {AP, AP50, ...}}`` over the processed images (or all images)."""
        validate_results(self.results, self.coco_gt, self.iou_types, source="predictions")
        ids = None if self.all_images else sorted(self.image_ids)
        if ids is not None and not ids:
            return {t: dict.fromkeys(METRIC_NAMES, 0.0) for t in self.iou_types}
        self.category_ap = {t: {} for t in self.iou_types}
        return {
            t: evaluate(
                self.coco_gt,
                self.results,
                t,
                image_ids=ids,
                verbose=self.verbose,
                evaluator=self.evaluator,
                per_category=self.category_ap[t],
            )
            for t in self.iou_types
        }


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width table, one row per IoU type, columns :data:`METRIC_NAMES`."""
    lines = ["iou_type " + " ".join(f"{m:>6}" for m in METRIC_NAMES)]
    for t, row in metrics.items():
        lines.append(f"{t:<8} " + " ".join(f"{row[m]:6.2f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def category_rows(coco_gt: COCO, *evaluators: CocoEvaluator) -> dict[int, dict[str, Any]]:
    """``{id: {"name", <iou_type>: AP, ...}}`` for every GT category, from finished evaluators."""
    rows: dict[int, dict[str, Any]] = {}
    for cat in coco_gt.loadCats(coco_gt.getCatIds()):
        cid = int(cat["id"])
        rows[cid] = {"name": str(cat.get("name", ""))}
        for ev in evaluators:
            rows[cid].update({t: aps.get(cid, float("nan")) for t, aps in ev.category_ap.items()})
    return rows


def format_category_table(rows: Mapping[int, Mapping[str, Any]]) -> str:
    """Per-category AP: one row per category id (``{id: {"name", <iou_type>: AP, ...}}``), one column per
    IoU type; ``-`` where a category has no GT among the evaluated images."""
    types = [t for t in IOU_TYPES if any(t in r for r in rows.values())]
    width = max([len("category"), *(len(str(r.get("name", ""))) for r in rows.values())])
    lines = [f"{'id':>6} {'category':<{width}} " + " ".join(f"{t:>8}" for t in types)]
    for cid in sorted(rows):
        r = rows[cid]
        cells = [f"{r[t]:8.2f}" if t in r and r[t] == r[t] else f"{'-':>8}" for t in types]
        lines.append(f"{cid:>6} {r.get('name', '')!s:<{width}} " + " ".join(cells))
    return "\n".join(lines)
