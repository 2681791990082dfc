"""Box conventions and small box ops.

``cxcywh``: (centre x, centre y, width, height); ``xyxy``: (x0, y0, x1, y1) with x0 ≤ x1, y0 ≤ y1.
Normalised boxes are relative to the unpadded network-input image; absolute boxes are in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_convert, clip_boxes_to_image

# The conversions are torchvision's (the same arithmetic as the official DETR code's, bit for bit).


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    """[..., 4] cxcywh → xyxy."""
    return box_convert(b, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    """[..., 4] xyxy → cxcywh."""
    return box_convert(b, "xyxy", "cxcywh")


def box_xywh_to_xyxy(b: Tensor) -> Tensor:
    """[..., 4] COCO xywh (top-left corner, size) → xyxy."""
    return box_convert(b, "xywh", "xyxy")


def scale_boxes(b: Tensor, hw: Tensor) -> Tensor:
    """Scale normalised [B, K, 4] boxes by per-image sizes ``hw`` [B, 2] (h, w) → pixels."""
    h, w = hw[:, 0].to(b.dtype), hw[:, 1].to(b.dtype)
    return b * torch.stack([w, h, w, h], dim=-1)[:, None, :]


def clip_boxes(b: Tensor, hw: Sequence[float]) -> Tensor:
    """[..., 4] absolute xyxy boxes clipped to an image of size ``hw`` (h, w): x to [0, w], y to [0, h]."""
    return clip_boxes_to_image(b, (hw[0], hw[1]))  # type: ignore[arg-type]  # float sizes clip the same


def coco_bbox(b: Tensor, hw: Sequence[float]) -> Tensor:
    """[..., 4] absolute xyxy boxes → COCO ``bbox`` (x, y, w, h), clipped to the image of size ``hw``
    (h, w) first, so a result box never reaches outside its image."""
    b = clip_boxes(b, hw)
    return torch.cat([b[..., :2], b[..., 2:] - b[..., :2]], dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """logit(x) with clamping; DINO uses eps 1e-3, H-Deformable-DETR 1e-5."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# IoU and GIoU stay ours: torchvision's ``box_iou`` / ``generalized_box_iou`` (and the official DETR
# ones) divide by a zero union or hull and return NaN for degenerate boxes (COCO has zero-width and
# zero-height ground-truth boxes; a [..., 4] box may collapse to a point), which would poison the
# Hungarian matching and the target assignment. Here degenerate areas count as 0 and an empty union
# or hull gives IoU 0 / no hull penalty; for valid boxes the values equal torchvision's.


def box_area(b: Tensor) -> Tensor:
    """Area of [..., 4] xyxy boxes (0 for degenerate boxes)."""
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes → [N, M] (0 where the union is empty)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise generalised IoU of [N, 4] and [M, 4] xyxy boxes → [N, M]."""
    iou = box_iou(a, b)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    inter_union = box_area(a)[:, None] + box_area(b)[None, :]
    lt2 = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb2 = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb2 - lt2).clamp(min=0).prod(-1)
    union = inter_union - inter
    return iou - torch.where(hull > 0, (hull - union) / hull.clamp(min=1e-12), torch.zeros_like(hull))
