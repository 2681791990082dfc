"""Target assignment and mask crops of the mask network (mfdetr.masknet.targets)."""

from __future__ import annotations

import pytest
import torch

from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError
from mfdetr.masknet.targets import (
    AssignConfig,
    assign,
    box_crowd_fraction,
    build_mask_targets,
    crop_masks,
    input_grid_boxes,
    pred_boxes_original,
)
from tests._masknet_data import make_det, make_gt


def test_pred_boxes_original_scales_normalised_boxes() -> None:
    det = make_det([[10, 20, 30, 60]], (100, 50), input_hw=(200, 100))
    assert torch.allclose(pred_boxes_original(det)[0, 0], torch.tensor([10.0, 20, 30, 60]), atol=1e-4)


def test_box_iou_assignment_threshold_and_best_gt() -> None:
    gt = make_gt([(10, 10, 30, 30), (40, 40, 60, 60)], (64, 64))
    det = make_det(
        [
            [10, 10, 30, 30],  # exact GT 0
            [12, 12, 32, 32],  # IoU 0.68 with GT 0
            [20, 20, 40, 40],  # IoU 0.14 with both → negative
            [41, 41, 60, 60],  # best is GT 1
            [0, 0, 2, 2],
        ],
        (64, 64),
    )
    a = assign(det, [gt], AssignConfig(iou_threshold=0.5))
    got = dict(zip(a.query_idx.tolist(), a.gt_idx.tolist(), strict=True))
    assert got == {0: 0, 1: 0, 3: 1}
    a2 = assign(det, [gt], AssignConfig(iou_threshold=0.7))
    assert dict(zip(a2.query_idx.tolist(), a2.gt_idx.tolist(), strict=True)) == {0: 0, 3: 1}


def test_crowd_is_never_positive_and_mostly_crowd_box_is_ignored() -> None:
    gt = make_gt([(0, 0, 32, 32), (40, 40, 60, 60)], (64, 64), crowd=[True, False])
    det = make_det(
        [
            [0, 0, 32, 32],  # exactly the crowd region
            [40, 40, 60, 60],  # the non-crowd GT
            [2, 2, 34, 34],
        ],
        (64, 64),
    )
    a = assign(det, [gt], AssignConfig())
    assert a.query_idx.tolist() == [1] and a.gt_idx.tolist() == [1]
    assert a.ignored[0].tolist() == [True, False, True]
    # even a box matching a non-crowd GT is ignored when crowd pixels cover most of it
    gt2 = make_gt([(0, 0, 40, 40), (0, 0, 40, 40)], (64, 64), crowd=[True, False])
    a2 = assign(make_det([[0, 0, 40, 40]], (64, 64)), [gt2], AssignConfig())
    assert len(a2) == 0 and bool(a2.ignored[0, 0])
    a3 = assign(make_det([[0, 0, 40, 40]], (64, 64)), [gt2], AssignConfig(method="hungarian", hungarian_cost="iou"))
    assert len(a3) == 0


def test_box_crowd_fraction() -> None:
    crowd = torch.zeros(10, 10, dtype=torch.bool)
    crowd[:, :5] = True
    f = box_crowd_fraction(crowd, torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 10], [5, 0, 10, 10], [20, 20, 30, 30]]))
    assert torch.allclose(f, torch.tensor([0.5, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("cost", ["detr", "iou"])
def test_hungarian_is_one_to_one(cost: str) -> None:
    gt = make_gt([(10, 10, 30, 30), (40, 40, 60, 60)], (64, 64), labels=[1, 2])
    det = make_det(
        [[10, 10, 30, 30], [11, 11, 31, 31], [40, 40, 60, 60], [41, 41, 61, 61]], (64, 64), labels=[1, 1, 2, 2]
    )
    a = assign(
        det,
        [gt],
        AssignConfig(method="hungarian", hungarian_cost=cost),  # type: ignore[arg-type]
        class_to_category=(0, 1, 2, 3),
    )
    assert sorted(a.gt_idx.tolist()) == [0, 1]
    assert len(set(a.query_idx.tolist())) == 2
    assert dict(zip(a.gt_idx.tolist(), a.query_idx.tolist(), strict=True)) == {0: 0, 1: 2}
    # box-IoU assignment gives all four boxes a target (more supervision per GT)
    assert len(assign(det, [gt], AssignConfig())) == 4


def test_hungarian_min_iou_and_missing_class_map() -> None:
    gt = make_gt([(10, 10, 30, 30)], (64, 64))
    det = make_det([[40, 40, 60, 60]], (64, 64))
    assert len(assign(det, [gt], AssignConfig(method="hungarian", hungarian_cost="iou"))) == 1
    assert len(assign(det, [gt], AssignConfig(method="hungarian", hungarian_cost="iou", hungarian_min_iou=0.1))) == 0
    with pytest.raises(MfdetrError, match="class_to_category"):
        assign(det, [gt], AssignConfig(method="hungarian"))


def test_empty_gt_and_empty_queries() -> None:
    det = make_det([[10, 10, 30, 30]], (64, 64))
    empty = make_gt([], (64, 64))
    for cfg in (AssignConfig(), AssignConfig(method="hungarian", hungarian_cost="iou")):
        a = assign(det, [empty], cfg)
        assert len(a) == 0 and a.ignored.shape == (1, 1)
        t = build_mask_targets(det, [empty], a, (8, 8))
        assert t.masks.shape == (0, 8, 8) and len(t) == 0


def test_crop_own_box_is_all_ones_and_half_box_is_half() -> None:
    gt = make_gt([(8, 16, 40, 48)], (64, 64))
    full = crop_masks(gt.masks, torch.tensor([[8.0, 16, 40, 48]]), torch.tensor([0]), (16, 16))
    assert bool((full == 1).all())
    # box twice as wide, the mask fills its left half exactly
    half = crop_masks(gt.masks, torch.tensor([[8.0, 16, 72, 48]]), torch.tensor([0]), (16, 16))
    assert bool((half[0, :, :8] == 1).all()) and bool((half[0, :, 8:] == 0).all())
    soft = crop_masks(gt.masks, torch.tensor([[6.0, 16, 42, 48]]), torch.tensor([0]), (9, 9), soft=True)
    assert 0 < float(soft.min()) < 1 and float(soft.max()) == 1.0


def test_build_targets_batched_and_gt_area() -> None:
    gt_a = make_gt([(0, 0, 16, 16), (20, 20, 60, 40)], (64, 64))
    gt_b = make_gt([(4, 4, 12, 12)], (32, 32))
    det_a = make_det([[0, 0, 16, 16], [20, 20, 40, 40], [20, 20, 60, 40]], (64, 64))
    det_b = make_det([[4, 4, 12, 12], [0, 0, 1, 1], [0, 0, 1, 1]], (32, 32))
    det = DetectorOutput(
        queries=torch.cat([det_a.queries, det_b.queries]),
        boxes=torch.cat([det_a.boxes, det_b.boxes]),
        logits=torch.cat([det_a.logits, det_b.logits]),
        enc_maps={4: [torch.zeros(2, 8, 2, 2)]},
        c1=torch.zeros(2, 4, 4, 4),
        input_hw=torch.tensor([[64, 64], [32, 32]]),
        orig_hw=torch.tensor([[64, 64], [32, 32]]),
        level_valid_hw=torch.tensor([[[2, 2]], [[2, 2]]]),
    )
    a = assign(det, [gt_a, gt_b], AssignConfig())
    t = build_mask_targets(det, [gt_a, gt_b], a, (8, 8))
    pairs = sorted(zip(t.batch_idx.tolist(), t.query_idx.tolist(), t.gt_idx.tolist(), strict=True))
    assert pairs == [(0, 0, 0), (0, 1, 1), (0, 2, 1), (1, 0, 0)]
    i = [k for k, p in enumerate(zip(t.batch_idx.tolist(), t.query_idx.tolist(), strict=True)) if p == (0, 1)][0]
    # box covers half of GT 1 (x 20..40 of 20..60): crop all ones, whole-GT area = 2× the grid
    assert bool((t.masks[i] == 1).all())
    assert t.gt_area[i].item() == pytest.approx(128.0, rel=1e-4)


def test_input_grid_targets_resample_whole_image() -> None:
    # non-RoI predictions on the stride-4 grid of a 32×48 input of a 64×96 original image, padded canvas
    gt = make_gt([(0, 0, 48, 64)], (64, 96))  # left half of the original image
    det = make_det([[0, 0, 48, 64]], (64, 96), input_hw=(32, 48))
    box = input_grid_boxes(det, (10, 14))
    assert torch.allclose(box[0], torch.tensor([0.0, 0.0, 112.0, 80.0]))
    a = assign(det, [gt], AssignConfig())
    t = build_mask_targets(det, [gt], a, (10, 14), on_input_grid=True)
    m = t.masks[0]
    assert bool((m[:8, :6] == 1).all()) and bool((m[:, 6:] == 0).all()) and bool((m[8:] == 0).all())


def test_crop_masks_chunked_equals_unchunked() -> None:
    gt = make_gt([(0, 0, 10, 12), (5, 5, 30, 20), (20, 3, 31, 31)], (32, 32))
    boxes = torch.tensor([[0.0, 0, 12, 12], [4, 4, 30, 22], [18, 2, 31, 31], [1, 1, 9, 9], [6, 6, 28, 18]])
    idx = torch.tensor([0, 1, 2, 0, 1])
    ref = crop_masks(gt.masks, boxes, idx, (8, 8), soft=True)
    got = crop_masks(gt.masks, boxes, idx, (8, 8), soft=True, max_elems=1)  # one mask per chunk
    assert torch.equal(ref, got) and float(ref.sum()) > 0
