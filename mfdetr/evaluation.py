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
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mfdetr.data.annotations import annotation_path, load_annotation_file
from mfdetr.data.masks import mask_to_rle
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write

if TYPE_CHECKING:  # torch stays unimported for eval-json
    from torch import Tensor

IOU_TYPES = ("segm", "bbox", "boundary")
MASK_IOU_TYPES = ("segm", "boundary")  # the types that score the results' masks
EVALUATORS = ("pycocotools", "faster")
BOUNDARY_DILATION_RATIO = 0.02  # the boundary band, as a fraction of the image diagonal
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

__all__ = [
    "BOUNDARY_DILATION_RATIO", "EVALUATORS", "IOU_TYPES", "MASK_IOU_TYPES", "METRIC_NAMES", "CocoEvaluator",
    "annotation_path", "category_ap", "category_rows", "coco_from_dict", "evaluate",
    "format_category_table", "format_table", "gt_to_results", "instances_to_results", "load_coco_gt", "mask_to_rle",
    "read_results_json", "validate_results", "write_results_json",
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


# --- results files ---------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_results(results: Any, coco_gt: COCO, iou_types: Sequence[str], *, source: str = "results"
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
                raise MfdetrError(f"results[{i}] needs 'segmentation' as an RLE {{size, counts}} "
                                  f"(for --iou-type {mask_types[0]})", path=source)
            img = coco_gt.imgs[iid]
            if seg["size"] != [img["height"], img["width"]]:
                raise MfdetrError(f"results[{i}] mask size {seg['size']} differs from image {iid}'s "
                                  f"[{img['height']}, {img['width']}]", path=source)
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
        d: dict[str, Any] = {"image_id": int(r["image_id"]), "category_id": int(r["category_id"]),
                             "score": float(r["score"])}
        if "bbox" in r:
            d["bbox"] = [float(v) for v in r["bbox"]]
        if "segmentation" in r:
            seg = r["segmentation"]
            counts = seg["counts"]
            d["segmentation"] = {"size": [int(seg["size"][0]), int(seg["size"][1])],
                                 "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        out.append(d)
    text = json.dumps(out, separators=(",", ":")).encode()
    atomic_write(path, lambda f: f.write(text), what="results JSON")
    return path


# --- conversions -----------------------------------------------------------------------------------
def instances_to_results(image_id: int, category_ids: Tensor | Sequence[int], scores: Tensor | Sequence[float],
                         boxes_xyxy: Tensor | np.ndarray | None = None, masks: Tensor | np.ndarray | None = None
                         ) -> list[dict[str, Any]]:
    """Per-image predictions → COCO result dicts.

    Args:
        category_ids: [N] COCO category ids; scores: [N].
        boxes_xyxy: [N, 4] absolute xyxy in the original image (converted to xywh), or ``None``.
        masks: [N, H0, W0] binary masks in the original image (→ RLE), or ``None``.
    """
    cats = [int(c) for c in (category_ids.tolist() if hasattr(category_ids, "tolist") else category_ids)]
    sc = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
    out: list[dict[str, Any]] = [{"image_id": int(image_id), "category_id": c, "score": s}
                                 for c, s in zip(cats, sc, strict=True)]
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
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": score,
                    "bbox": [float(v) for v in ann["bbox"]],
                    "segmentation": {"size": [int(rle["size"][0]), int(rle["size"][1])],
                                     "counts": rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes)
                                     else rle["counts"]}})
    return out


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


def evaluate(coco_gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str, *,
             image_ids: Iterable[int] | None = None, verbose: bool = False, evaluator: str = "pycocotools",
             per_category: dict[int, float] | None = None) -> dict[str, float]:
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
    return {name: float(ev.stats[k] * 100.0) if ev.stats[k] >= 0 else float("nan")
            for k, name in enumerate(METRIC_NAMES)}


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

    def __init__(self, *, coco_gt: COCO, iou_types: Sequence[str] = ("segm", "bbox"), all_images: bool = False,
                 verbose: bool = False, evaluator: str = "pycocotools") -> None:
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
        return {t: evaluate(self.coco_gt, self.results, t, image_ids=ids, verbose=self.verbose,
                            evaluator=self.evaluator, per_category=self.category_ap[t]) for t in self.iou_types}


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
