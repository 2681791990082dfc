"""Box ops against torchvision.ops: conversions and clipping are torchvision's; IoU / GIoU equal
torchvision's on valid boxes and stay finite on degenerate ones."""

from __future__ import annotations

import torch
import torchvision.ops as tvo

from mfdetr.ops.boxes import box_cxcywh_to_xyxy, box_iou, box_xywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


def test_conversions_round_trip_and_match_the_official_arithmetic() -> None:
    b = _boxes(7, 0).float()
    c = box_xyxy_to_cxcywh(b)
    assert torch.equal(c[:, 2:], b[:, 2:] - b[:, :2]) and torch.equal(c[:, :2], (b[:, :2] + b[:, 2:]) / 2)
    cx, cy, w, h = c.unbind(-1)  # the official DETR formula, bit for bit
    assert torch.equal(box_cxcywh_to_xyxy(c), torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1))
    assert box_cxcywh_to_xyxy(c[None, None]).shape == (1, 1, 7, 4)  # any leading dims
    assert torch.equal(box_xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), torch.tensor([[1.0, 2.0, 4.0, 6.0]]))


def test_iou_and_giou_equal_torchvision_on_valid_boxes() -> None:
    a, b = _boxes(9, 1), _boxes(5, 2)
    assert torch.allclose(box_iou(a, b), tvo.box_iou(a, b), rtol=0, atol=1e-12)
    assert torch.allclose(generalized_box_iou(a, b), tvo.generalized_box_iou(a, b), rtol=0, atol=1e-12)
    assert (box_iou(a, b) > 0).any() and (generalized_box_iou(a, b) < 0).any()


def test_degenerate_boxes_give_zero_not_nan() -> None:
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]])
    assert tvo.box_iou(point, point).isnan().all()  # why ours stays: torchvision divides by a zero union
    assert box_iou(point, point).tolist() == [[0.0]]
    assert generalized_box_iou(point, point).tolist() == [[0.0]]
    line = torch.tensor([[0.1, 0.2, 0.1, 0.6]])  # zero width, as some COCO ground truth
    assert torch.isfinite(generalized_box_iou(line, torch.cat([line, point]))).all()
