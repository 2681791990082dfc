"""Mask pasting, scoring and COCO results of the mask network (mfdetr.masknet.postprocess)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mfdetr.errors import MfdetrError
from mfdetr.masknet.postprocess import encode_rle, masks_to_coco_results, paste_masks
from mfdetr.masknet.targets import crop_masks
from tests._masknet_data import make_det, make_gt


@dataclass
class Out:
    mask_logits: torch.Tensor
    iou_pred: torch.Tensor | None


def test_box_filling_mask_pastes_exactly_the_box() -> None:
    for s in (4, 32):  # box larger and smaller than the grid
        probs = torch.ones(2, s, s)
        boxes = torch.tensor([[3.0, 5.0, 20.0, 13.0], [-4.0, 10.0, 6.0, 40.0]])  # 2nd leaves the image
        masks, mean = paste_masks(probs, boxes, (30, 24))
        ref = torch.zeros(2, 30, 24, dtype=torch.bool)
        ref[0, 5:13, 3:20] = True
        ref[1, 10:30, 0:6] = True
        assert torch.equal(masks, ref), s
        assert mean.tolist() == pytest.approx([1.0, 1.0])


def test_crop_then_paste_reproduces_a_rectangle() -> None:
    gt = make_gt([(10, 7, 31, 29)], (48, 40))
    box = torch.tensor([[4.0, 2.0, 37.5, 40.0]])  # loose box around the rectangle
    for s in (16, 32, 64):
        crop = crop_masks(gt.masks, box, torch.tensor([0]), (s, s), soft=True)
        masks, _ = paste_masks(crop, box, (48, 40))
        inter = (masks[0] & gt.masks[0]).sum().item()
        union = (masks[0] | gt.masks[0]).sum().item()
        assert inter / union > 0.93, s
    # integer box = the rectangle: exact
    crop = crop_masks(gt.masks, torch.tensor([[10.0, 7, 31, 29]]), torch.tensor([0]), (32, 32))
    masks, _ = paste_masks(crop, torch.tensor([[10.0, 7, 31, 29]]), (48, 40))
    assert torch.equal(masks[0], gt.masks[0])


def test_empty_and_degenerate_masks() -> None:
    masks, mean = paste_masks(torch.zeros(2, 8, 8), torch.tensor([[1.0, 1, 9, 9], [5.0, 5, 5, 5]]), (16, 16))
    assert not bool(masks.any()) and mean.tolist() == [0.0, 0.0]
    masks, mean = paste_masks(torch.zeros(0, 8, 8), torch.zeros(0, 4), (16, 16))
    assert masks.shape == (0, 16, 16)
    assert encode_rle(masks) == []
    masks, _ = paste_masks(torch.ones(1, 8, 8), torch.tensor([[100.0, 100, 120, 120]]), (16, 16))
    assert not bool(masks.any())


def test_mean_prob_is_eq2_ratio() -> None:
    probs = torch.full((1, 4, 4), 0.2)
    probs[0, :, :2] = 0.8
    masks, mean = paste_masks(probs, torch.tensor([[0.0, 0, 40, 40]]), (40, 40))
    fg = masks[0]
    assert 0.4 < fg.float().mean().item() < 0.6
    # bilinear values above 0.5 near the edge are a bit below 0.8
    assert 0.7 < mean.item() <= 0.8


def test_rle_round_trip() -> None:
    m = torch.zeros(2, 9, 7, dtype=torch.bool)
    m[0, 2:5, 1:6] = True
    rles = encode_rle(m)
    assert isinstance(rles[0]["counts"], str) and rles[0]["size"] == [9, 7]
    dec = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(dec.transpose(2, 0, 1).astype(bool), m.numpy())


def _coco_gt(tmp_path, gt_rects: list[tuple[int, int, int, int]], hw: tuple[int, int]) -> COCO:
    h, w = hw
    anns = []
    for i, (x0, y0, x1, y1) in enumerate(gt_rects):
        m = np.zeros((h, w), dtype=np.uint8, order="F")
        m[y0:y1, x0:x1] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append(
            {
                "id": i + 1,
                "image_id": 7,
                "category_id": 3,
                "iscrowd": 0,
                "area": float(m.sum()),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            }
        )
    data = {
        "images": [{"id": 7, "height": h, "width": w, "file_name": "x.jpg"}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "c"}, {"id": 5, "name": "d"}],
    }
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(data))
    return COCO(str(p))


@pytest.mark.parametrize("mode", ["mask_prob", "mask_iou", "box"])
def test_coco_results_load_and_evaluate(tmp_path, mode: str) -> None:
    rects = [(4, 6, 20, 30), (30, 10, 44, 20)]
    hw = (40, 48)
    # detector on a 2× downscaled input: boxes are normalised, so the original frame is recovered
    det = make_det(
        [list(map(float, r)) for r in rects] + [[0.0, 0, 10, 10]],
        hw,
        num_classes=6,
        labels=[3, 3, 0],
        input_hw=(20, 24),
    )
    det.logits[0, 2, 0] = 5.0  # third query's arg-max slot maps to category 0 → dropped
    logits = torch.full((1, 3, 8, 8), 6.0)
    out = Out(logits, torch.tensor([[0.9, 0.5, 0.7]]) if mode != "box" else None)
    c2c = (0, 0, 0, 3, 0, 5)
    res = masks_to_coco_results(out, det, c2c, [7], score=mode)  # type: ignore[arg-type]
    assert len(res) == 2
    assert [r["category_id"] for r in res] == [3, 3]
    assert res[0]["bbox"] == pytest.approx([4, 6, 16, 24], abs=1e-3)
    c = float(torch.sigmoid(torch.tensor(5.0)))
    expect = {
        "mask_prob": [c * float(torch.sigmoid(torch.tensor(6.0)))] * 2,
        "mask_iou": [c * 0.9, c * 0.5],
        "box": [c, c],
    }[mode]
    assert [r["score"] for r in res] == pytest.approx(expect, abs=1e-4)
    json.dumps(res)
    gt = _coco_gt(tmp_path, rects, hw)
    dt = gt.loadRes(res)
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # box-filling masks of the exact boxes = the GT rectangles


def test_coco_results_errors_and_min_score() -> None:
    det = make_det([[0.0, 0, 10, 10]], (20, 20), num_classes=2, labels=[1])
    out = Out(torch.zeros(1, 1, 4, 4), None)
    with pytest.raises(MfdetrError, match="mask_iou"):
        masks_to_coco_results(out, det, (0, 1), [1], score="mask_iou")
    assert masks_to_coco_results(out, det, (0, 1), [1], score="box", min_score=0.999) == []
    # all-zero logits: probability 0.5 is not > 0.5 → empty mask, eq. 2 score 0, still a valid result
    r = masks_to_coco_results(out, det, (0, 1), [1], score="mask_prob")
    assert len(r) == 1 and r[0]["score"] == 0.0


def test_input_grid_masks_are_cropped_and_resized() -> None:
    # non-RoI baseline: logits on the padded stride-4 grid of a 24×32 input (valid 6×8 cells, padded to 8×10)
    # for a 48×64 original; foreground = left half of the valid region
    det = make_det([[0.0, 0, 32, 48]], (48, 64), num_classes=2, labels=[1], input_hw=(24, 32))
    logits = torch.full((1, 1, 8, 10), -8.0)
    logits[0, 0, :6, :4] = 8.0
    logits[0, 0, 6:, :] = 8.0  # padding rows must not leak into the image
    res = masks_to_coco_results(Out(logits, None), det, (0, 1), [1], score="mask_prob", on_input_grid=True)
    m = mask_util.decode({"size": res[0]["segmentation"]["size"], "counts": res[0]["segmentation"]["counts"].encode()})
    ref = np.zeros((48, 64), dtype=np.uint8)
    ref[:, :32] = 1
    assert m.shape == (48, 64) and np.array_equal(m, ref)
