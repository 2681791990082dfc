"""COCO evaluation: perfect predictions, perturbed predictions, agreement with raw pycocotools, CLI."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from mfdetr.data.synth import SynthConfig, generate_synth
from mfdetr.errors import MfdetrError
from mfdetr.evaluation import (
    METRIC_NAMES,
    CocoEvaluator,
    evaluate,
    format_table,
    gt_to_results,
    instances_to_results,
    load_coco_gt,
    mask_to_rle,
    read_results_json,
    validate_results,
    write_results_json,
)
from tests._data_helpers import make_tiny_coco
from tests.conftest import assert_user_error, cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalsynth") / "coco"
    generate_synth(out, config=SynthConfig(train=1, val=12, image_size=160, seed=7))
    return out


@pytest.fixture(scope="module")
def gt(coco_dir: Path) -> COCO:
    return load_coco_gt(coco_dir / "annotations" / "instances_val2017.json")


def _perturb(gt: COCO, results: list[dict], rng: np.random.Generator) -> list[dict]:
    """Erode or shift every mask, jitter boxes, random scores."""
    out = []
    for r in copy.deepcopy(results):
        m = mask_utils.decode(r["segmentation"]).astype(bool)
        if rng.random() < 0.5:
            m = ndimage.binary_erosion(m, iterations=2)
        else:
            m = np.roll(m, shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        if not m.any():
            continue
        r["segmentation"] = mask_to_rle(m)
        x, y, w, h = r["bbox"]
        r["bbox"] = [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.8, 1.2), h]
        r["score"] = float(rng.uniform(0.05, 1.0))
        out.append(r)
    return out


def _direct(gt_file: Path, res_file: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO(str(gt_file))
        ev = COCOeval(g, g.loadRes(str(res_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v * 100) if v >= 0 else math.nan for v in ev.stats[:6]]


def _same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9) for x, y in zip(a, b))


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_gt_as_predictions_is_perfect(gt, iou_type):
    m = evaluate(gt, gt_to_results(gt), iou_type)
    assert m["AP"] == 100.0 and m["AP50"] == 100.0 and m["AP75"] == 100.0
    assert all(math.isnan(m[k]) or m[k] == 100.0 for k in METRIC_NAMES)
    assert not math.isnan(m["APs"]) and not math.isnan(m["APm"])


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perturbed_predictions_score_lower(gt, iou_type):
    bad = _perturb(gt, gt_to_results(gt), np.random.default_rng(0))
    m = evaluate(gt, bad, iou_type)
    assert 5.0 < m["AP"] < 90.0 and m["AP50"] >= m["AP75"]


def test_numbers_equal_direct_pycocotools(gt, coco_dir, tmp_path):
    gt_file = coco_dir / "annotations" / "instances_val2017.json"
    res = _perturb(gt, gt_to_results(gt), np.random.default_rng(1))
    both = write_results_json(tmp_path / "both.json", res)
    segm_only = write_results_json(tmp_path / "segm.json", [{k: v for k, v in r.items() if k != "bbox"} for r in res])
    ours_bbox = evaluate(gt, read_results_json(both, gt, ["bbox"]), "bbox")
    assert _same([ours_bbox[k] for k in METRIC_NAMES], _direct(gt_file, both, "bbox"))
    ours_segm = evaluate(gt, read_results_json(both, gt, ["segm"]), "segm")
    assert _same([ours_segm[k] for k in METRIC_NAMES], _direct(gt_file, segm_only, "segm"))
    # with boxes in the file pycocotools sizes detections by box area: AP/AP50/AP75 still agree
    assert _same([ours_segm[k] for k in ("AP", "AP50", "AP75")], _direct(gt_file, both, "segm")[:3])


def test_empty_results_are_zeros(gt):
    assert evaluate(gt, [], "segm") == dict.fromkeys(METRIC_NAMES, 0.0)
    ev = CocoEvaluator(coco_gt=gt)
    assert ev.finish()["bbox"]["AP"] == 0.0


def test_streaming_evaluator_matches_evaluate(gt):
    perfect = gt_to_results(gt)
    ids = sorted(gt.imgs)
    ev = CocoEvaluator(coco_gt=gt, iou_types=("segm", "bbox"))
    ev.reset()
    for iid in ids[:6]:  # per-image tensors, as a model would produce them
        mine = [r for r in perfect if r["image_id"] == iid]
        masks = torch.from_numpy(np.stack([mask_utils.decode(r["segmentation"]) for r in mine])) if mine else None
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)]).reshape(-1, 4)
        ev.process(
            instances_to_results(
                iid,
                torch.tensor([r["category_id"] for r in mine], dtype=torch.long),
                torch.ones(len(mine)),
                boxes,
                masks,
            ),
            image_ids=[iid],
        )
    out = ev.finish()
    assert out["segm"]["AP"] == 100.0 and out["bbox"]["AP"] == 100.0  # scored on the images seen only
    full = CocoEvaluator(coco_gt=gt, iou_types=("segm",), all_images=True)
    full.process([r for r in perfect if r["image_id"] in ids[:6]])
    partial = full.finish()["segm"]["AP"]
    n_seen = sum(1 for a in gt.anns.values() if a["image_id"] in ids[:6] and not a["iscrowd"])
    if n_seen < sum(1 for a in gt.anns.values() if not a["iscrowd"]):
        assert partial < 100.0  # missed images count against recall
    assert "segm" in format_table(out) and "100.00" in format_table(out)


def test_results_validation(gt):
    good = gt_to_results(gt)[:2]
    ev = CocoEvaluator(coco_gt=gt)
    ev.process([{**good[0], "image_id": 424242}])
    with pytest.raises(MfdetrError, match="predictions: results\\[0\\] has unknown image id 424242"):
        ev.finish()
    with pytest.raises(MfdetrError, match="unknown image id 424242"):
        validate_results([{**good[0], "image_id": 424242}], gt, ["segm"])
    with pytest.raises(MfdetrError, match="unknown category id 99"):
        validate_results([{**good[0], "category_id": 99}], gt, ["bbox"])
    with pytest.raises(MfdetrError, match="has no 'score'"):
        validate_results([{k: v for k, v in good[0].items() if k != "score"}], gt, ["segm"])
    with pytest.raises(MfdetrError, match="needs 'segmentation'"):
        validate_results([{k: v for k, v in good[0].items() if k != "segmentation"}], gt, ["segm"])
    with pytest.raises(MfdetrError, match="mask size"):
        validate_results([{**good[0], "segmentation": mask_to_rle(np.ones((3, 3)))}], gt, ["segm"])
    with pytest.raises(MfdetrError, match="JSON list"):
        validate_results({"a": 1}, gt, ["segm"])


def test_eval_json_cli(gt, coco_dir, tmp_path):
    res = write_results_json(tmp_path / "r.json", gt_to_results(gt))
    proc = cli(
        "eval-json", "--coco", coco_dir, "--split", "val2017", "--results", res, "--iou-type", "both", check=True
    )
    rows = {ln.split()[0]: ln.split()[1:] for ln in proc.stdout.splitlines()}
    assert rows["segm"][:3] == ["100.00"] * 3 and rows["bbox"][0] == "100.00"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1,')
    assert_user_error(cli("eval-json", "--coco", coco_dir, "--results", bad), str(bad), "malformed results JSON")
    assert_user_error(
        cli("eval-json", "--coco", coco_dir, "--results", tmp_path / "none.json"), "none.json", "results file not found"
    )
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 5, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}]))
    assert_user_error(
        cli("eval-json", "--coco", coco_dir, "--results", wrong, "--iou-type", "bbox"), str(wrong), "unknown image id 5"
    )


def test_eval_json_cli_bad_coco_inputs(tmp_path):
    """Through the CLI: bad COCO folders / annotation files → one-line errors."""
    res = tmp_path / "r.json"
    res.write_text("[]")
    assert_user_error(
        cli("eval-json", "--coco", tmp_path / "missing", "--results", res), "missing", "COCO folder not found"
    )
    root = tmp_path / "coco"
    ann = make_tiny_coco(root)
    assert_user_error(
        cli("eval-json", "--coco", root, "--split", "test2017", "--results", res),
        "instances_test2017.json",
        "annotation file not found",
    )
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 42
    ann.write_text(json.dumps(data))
    assert_user_error(cli("eval-json", "--coco", root, "--results", res), str(ann), "unknown category id 42")
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert_user_error(cli("eval-json", "--coco", root, "--results", res), str(ann), "empty split")
