"""Boundary AP (and the faster-coco-eval evaluator) against a direct computation from the definition.

The definition, written out here: a mask's boundary is the mask minus its erosion by
d = max(1, round(0.02 · image diagonal)) pixels (a 3×3 square kernel applied d times, zero outside the
image); boundary IoU is the IoU of two boundaries; a detection matches a GT at min(mask IoU, boundary IoU).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from faster_coco_eval.core import mask as faster_mask
from pycocotools import mask as mask_utils
from scipy import ndimage

from mfdetr.data.synth import SynthConfig, generate_synth
from mfdetr.errors import MfdetrError
from mfdetr.evaluation import (
    CocoEvaluator,
    coco_from_dict,
    evaluate,
    gt_to_results,
    load_coco_gt,
    mask_to_rle,
    write_results_json,
)
from tests.conftest import assert_user_error, cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2

H = W = 200
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's


def boundary(m: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    h, w = m.shape
    d = max(1, int(round(ratio * math.hypot(h, w))))
    eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), iterations=d, border_value=0)
    return m & ~eroded


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def square(y0: int = 40, x0: int = 40, size: int = 120) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def ragged(m: np.ndarray, depth: int, period: int) -> np.ndarray:
    """The square ``m`` with teeth cut ``depth`` pixels deep into each side, every other period/2 pixels."""
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    out = m.copy()
    teeth = (np.arange(max(H, W)) // (period // 2)) % 2 == 0
    for k in range(depth):
        for r in (y0 + k, y1 - k):
            out[r, x0 : x1 + 1] &= ~teeth[x0 : x1 + 1]
        for c in (x0 + k, x1 - k):
            out[y0 : y1 + 1, c] &= ~teeth[y0 : y1 + 1]
    return out


def coco_dict(gt_masks: list[np.ndarray]) -> dict:
    """One image per GT mask, one category."""
    anns = []
    for i, m in enumerate(gt_masks, start=1):
        ys, xs = np.nonzero(m)
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "iscrowd": 0,
                "area": float(m.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                "segmentation": mask_to_rle(m),
            }
        )
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in range(1, len(gt_masks) + 1)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def results(pred_masks: list[np.ndarray]) -> list[dict]:
    return [
        {"image_id": i, "category_id": 1, "score": 1.0, "segmentation": mask_to_rle(m)}
        for i, m in enumerate(pred_masks, start=1)
    ]


def expected_ap(ious: list[float]) -> float:
    """AP of one image with one GT and one detection: the share of COCO's thresholds its IoU clears."""
    return float(np.mean([[100.0 if v >= t else 0.0 for t in IOU_THRESHOLDS] for v in ious]))


def test_definition_boundary_equals_package_boundary() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(4, 90, 2))
        m = np.zeros((h, w), bool)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = True
        m |= rng.random((h, w)) < 0.05
        rle = faster_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        got = faster_mask.decode(faster_mask.rleToBoundary(rle, 0.02)).astype(bool)
        np.testing.assert_array_equal(got, boundary(m))


def test_per_pair_matching_iou_is_min_of_mask_and_boundary_iou() -> None:
    g = [square(30, 30, 100), square(120, 110, 60)]
    d = [ragged(square(30, 30, 100), 3, 6), np.roll(square(120, 110, 60), (4, -3), (0, 1)), square(60, 60, 90)]
    data = coco_dict([g[0]])
    data["annotations"].append({**coco_dict([g[1]])["annotations"][0], "id": 2})
    gt = FasterCOCO(data)
    res = [
        {"image_id": 1, "category_id": 1, "score": 1.0 - 0.1 * k, "segmentation": mask_to_rle(m)}
        for k, m in enumerate(d)
    ]
    ev = COCOeval_faster(gt, gt.loadRes(res), "boundary", print_function=lambda *a: None)
    ev.evaluate()
    got = np.asarray(ev.ious[(1, 1)])
    want = np.array([[min(iou(dm, gm), iou(boundary(dm), boundary(gm))) for gm in g] for dm in d])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert (want < np.array([[iou(dm, gm) for gm in g] for dm in d])).any()  # the boundary term matters
    # the package's boundary IoU of one pair on its own
    b = [
        faster_mask.rleToBoundary(faster_mask.encode(np.asfortranarray(m.astype(np.uint8))), 0.02) for m in (d[0], g[0])
    ]
    assert float(faster_mask.iou([b[0]], [b[1]], [0])[0][0]) == pytest.approx(iou(boundary(d[0]), boundary(g[0])))


def test_perfect_masks_give_boundary_ap_100() -> None:
    gt_masks = [square(), square(10, 50, 150), square(0, 0, 80)]  # the last one touches the image border
    gt = coco_from_dict(coco_dict(gt_masks))
    out = evaluate(gt, gt_to_results(gt), "boundary")
    assert out["AP"] == 100.0 and out["AP50"] == 100.0 and out["AP75"] == 100.0


def test_ragged_border_lowers_boundary_ap_as_the_definition_says() -> None:
    gt_masks = [square() for _ in range(4)]
    teeth = [(2, 4), (3, 6), (4, 8), (6, 4)]  # (depth, period) per image
    preds = [ragged(m, depth, period) for m, (depth, period) in zip(gt_masks, teeth, strict=True)]
    gt = coco_from_dict(coco_dict(gt_masks))
    mask_ious = [iou(p, g) for p, g in zip(preds, gt_masks, strict=True)]
    matching = [min(v, iou(boundary(p), boundary(g))) for v, p, g in zip(mask_ious, preds, gt_masks, strict=True)]
    # each image alone: its AP is the share of thresholds its IoU clears
    for i, (mv, bv) in enumerate(zip(mask_ious, matching, strict=True), start=1):
        assert evaluate(gt, results(preds), "segm", image_ids=[i])["AP"] == pytest.approx(expected_ap([mv]), abs=1e-6)
        one = evaluate(gt, results(preds), "boundary", image_ids=[i])
        assert one["AP"] == pytest.approx(expected_ap([bv]), abs=1e-6)
        assert one["AP50"] == (100.0 if bv >= 0.5 else 0.0)
    segm = evaluate(gt, results(preds), "segm")
    bnd = evaluate(gt, results(preds), "boundary")
    assert segm["AP"] >= 80.0 and bnd["AP"] <= segm["AP"] - 40.0


def test_streaming_evaluator_reports_boundary_and_rejects_unknown_evaluator() -> None:
    gt_masks = [square(), square(20, 30, 100)]
    gt = coco_from_dict(coco_dict(gt_masks))
    ev = CocoEvaluator(coco_gt=gt, iou_types=("segm", "boundary"))
    ev.process(results([ragged(gt_masks[0], 6, 4), gt_masks[1]]))
    out = ev.finish()
    assert set(out) == {"segm", "boundary"} and out["boundary"]["AP"] < out["segm"]["AP"]
    with pytest.raises(MfdetrError, match="unknown evaluator"):
        CocoEvaluator(coco_gt=gt, evaluator="detectron")
    with pytest.raises(MfdetrError, match="unknown iou type"):
        evaluate(gt, results(gt_masks), "contour")


@pytest.fixture(scope="module")
def synth_gt(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bsynth") / "coco"
    generate_synth(out, config=SynthConfig(train=1, val=10, image_size=160, seed=3))
    return out, load_coco_gt(out / "annotations" / "instances_val2017.json")


def _perturbed(gt, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for r in copy.deepcopy(gt_to_results(gt)):
        m = mask_utils.decode(r["segmentation"]).astype(bool)
        m = (
            ndimage.binary_erosion(m, iterations=1)
            if rng.random() < 0.5
            else np.roll(m, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), (0, 1))
        )
        if not m.any():
            continue
        x, y, w, h = r["bbox"]
        out.append(
            {
                **r,
                "segmentation": mask_to_rle(m),
                "score": float(rng.uniform(0.05, 1.0)),
                "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.8, 1.2), h],
            }
        )
    return out


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_faster_evaluator_equals_pycocotools_on_the_synthetic_set(synth_gt, iou_type: str) -> None:
    _, gt = synth_gt
    res = _perturbed(gt, seed=11)
    ref = evaluate(gt, res, iou_type)
    fast = evaluate(gt, res, iou_type, evaluator="faster")
    assert 5.0 < ref["AP"] < 99.0  # a non-trivial score
    for k, v in ref.items():
        assert fast[k] == pytest.approx(v, abs=0.01, nan_ok=True), k


def test_eval_json_boundary_cli(synth_gt, tmp_path: Path) -> None:
    coco_dir, gt = synth_gt
    res = write_results_json(tmp_path / "perfect.json", gt_to_results(gt))
    proc = cli(
        "eval-json", "--coco", coco_dir, "--results", res, "--iou-type", "all", "--evaluator", "faster", check=True
    )
    rows = {ln.split()[0]: ln.split()[1:] for ln in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"segm", "boundary", "bbox"} and all(r[0] == "100.00" for r in rows.values())
    noseg = tmp_path / "noseg.json"
    noseg.write_text(json.dumps([{k: v for k, v in r.items() if k != "segmentation"} for r in gt_to_results(gt)]))
    assert_user_error(
        cli("eval-json", "--coco", coco_dir, "--results", noseg, "--iou-type", "boundary"),
        str(noseg),
        "--iou-type boundary",
    )


def test_boundary_after_pycocotools_scored_the_same_gt(synth_gt) -> None:
    _, gt = synth_gt  # pycocotools rewrites the GT's polygons as RLEs in place; boundary AP reads those
    perfect = gt_to_results(gt)
    assert evaluate(gt, perfect, "segm")["AP"] == 100.0
    assert evaluate(gt, perfect, "boundary")["AP"] == 100.0
    assert evaluate(gt, perfect, "segm", evaluator="faster")["AP"] == 100.0


def test_eval_cli_refuses_an_unknown_evaluator(tmp_path: Path) -> None:
    assert_user_error(
        cli("eval", "--cache", tmp_path, "--checkpoint", tmp_path / "ckpt.pt", "--evaluator", "detectron"),
        "unknown --evaluator 'detectron'",
    )
