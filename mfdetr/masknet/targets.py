"""Training targets of the mask network: which GT instance each predicted box learns, and its mask.

The frozen detector gives K boxes per image; the mask network predicts a mask inside each of them
(eq. 3-4). Training needs, for some of those boxes, the GT instance they cover and that instance's
mask **cropped to the predicted box** on the same S×S grid the network predicts on.

The assignment (which GT each box learns) is :mod:`mfdetr.masknet.assignment`'s.

Crops (:func:`crop_masks`) follow Mask R-CNN (detectron2 ``BitMasks.crop_and_resize``): RoIAlign of
the float GT mask at original resolution with the predicted box in original pixels, ``aligned=True``,
then ``≥ 0.5`` (or soft targets with ``soft_targets=True``). The box is the same normalised box the
network pools with, scaled by the original size (the resize is uniform), so target and prediction
grids coincide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torchvision.ops import roi_align

from mfdetr.contracts import DetectorOutput, GTInstances

# the assignment, re-exported: the criterion and its users import it from here
from mfdetr.masknet.assignment import AssignConfig as AssignConfig
from mfdetr.masknet.assignment import Assignment as Assignment
from mfdetr.masknet.assignment import assign as assign
from mfdetr.masknet.assignment import box_crowd_fraction as box_crowd_fraction
from mfdetr.masknet.assignment import pred_boxes_original as pred_boxes_original

__all__ = [
    "AssignConfig",
    "Assignment",
    "MaskTargets",
    "assign",
    "box_crowd_fraction",
    "build_mask_targets",
    "crop_masks",
    "first_queries",
    "input_grid_boxes",
    "is_input_grid_output",
    "pred_boxes_original",
]


@dataclass
class MaskTargets:
    """Mask targets of the positives of an :class:`Assignment` on the prediction grid.

    - ``batch_idx``, ``query_idx``, ``gt_idx`` [P] int64 — as in :class:`Assignment`.
    - ``masks`` [P, Sh, Sw] float in [0, 1] (binary unless ``soft_targets``) — the GT mask cropped to the
      predicted box (or resampled onto the input grid for non-RoI predictions).
    - ``gt_area`` [P] float — area of the *whole* GT mask in units of grid cells of that prediction
      (may exceed the cropped area when the object sticks out of the box); used for the mask-IoU
      target as in Mask Scoring R-CNN.
    """

    batch_idx: Tensor
    query_idx: Tensor
    gt_idx: Tensor
    masks: Tensor
    gt_area: Tensor

    def __len__(self) -> int:
        return int(self.batch_idx.numel())


def first_queries(det: DetectorOutput, k: int) -> DetectorOutput:
    """``det`` restricted to its first (top-scored) ``k`` queries (the mask network may segment fewer
    queries than were cached); feature maps are shared, not copied."""
    if k == det.num_queries:
        return det
    if not 0 <= k <= det.num_queries:
        raise ValueError(f"cannot take {k} of {det.num_queries} queries")
    return replace(det, queries=det.queries[:, :k], boxes=det.boxes[:, :k], logits=det.logits[:, :k])


def is_input_grid_output(out: object) -> bool:
    """Whether a mask network output holds non-RoI masks on the stride-4 input grid (the baseline
    without RoIAlign) rather than masks on each box's RoI grid."""
    for name in ("on_input_grid", "input_grid"):
        v = getattr(out, name, None)
        if isinstance(v, bool):
            return v
    return getattr(out, "roi", None) is False


def crop_masks(
    masks: Tensor,
    boxes: Tensor,
    mask_idx: Tensor,
    out_size: tuple[int, int],
    *,
    soft: bool = False,
    max_elems: int = 1 << 26,
) -> Tensor:
    """Crop-and-resize binary masks to boxes (Mask R-CNN targets, detectron2 ``crop_and_resize``).

    Args:
        masks: [N, H, W] bool/float masks of one image (original resolution).
        boxes: [P, 4] xyxy boxes in pixels of that image (may extend beyond it; outside is 0).
        mask_idx: [P] index into ``masks`` of each box's mask.
        out_size: (Sh, Sw) output grid.
        soft: return RoIAligned values in [0, 1] instead of ``≥ 0.5``.
        max_elems: memory bound: at most this many mask pixels are converted to float at once (the
            distinct masks are processed in chunks, one ``roi_align`` call per chunk).

    Returns:
        [P, Sh, Sw] float32 targets.
    """
    p = int(boxes.shape[0])
    dev = boxes.device
    out = torch.zeros((p, *out_size), dtype=torch.float32, device=dev)
    if p == 0:
        return out
    uniq, inv = torch.unique(mask_idx.to(masks.device), return_inverse=True)
    inv = inv.to(dev)
    boxes = boxes.to(torch.float32)
    chunk = max(1, max_elems // max(1, int(masks.shape[-2]) * int(masks.shape[-1])))
    for s in range(0, int(uniq.numel()), chunk):
        e = min(int(uniq.numel()), s + chunk)
        src = masks[uniq[s:e]].to(device=dev).to(torch.float32)[:, None]  # move as bool, convert there
        sel = torch.nonzero((inv >= s) & (inv < e)).flatten()
        rois = torch.cat([(inv[sel] - s).to(torch.float32)[:, None], boxes[sel]], dim=1)
        out[sel] = roi_align(src, rois, out_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0]
    return out.clamp(0, 1) if soft else (out >= 0.5).to(torch.float32)


def input_grid_boxes(det: DetectorOutput, grid_hw: tuple[int, int], stride: int = 4) -> Tensor:
    """[B, 4] xyxy box, in original pixels, covered by a whole stride-``stride`` input-grid map.

    A non-RoI prediction on the padded stride-4 grid (Hg, Wg) covers input pixels [0, stride·Wg) ×
    [0, stride·Hg); the valid input (``input_hw``) maps onto the original image (``orig_hw``), so the
    grid covers the original-pixel box (0, 0, stride·Wg·w0/w_in, stride·Hg·h0/h_in). Cropping a GT mask
    with this box, or pasting a grid mask into it, resamples between grid and original image exactly.
    """
    ih = det.input_hw.to(torch.float32)
    oh = det.orig_hw.to(torch.float32)
    hg, wg = grid_hw
    x1 = stride * wg * oh[:, 1] / ih[:, 1]
    y1 = stride * hg * oh[:, 0] / ih[:, 0]
    z = torch.zeros_like(x1)
    return torch.stack([z, z, x1, y1], dim=-1)


def build_mask_targets(
    det: DetectorOutput,
    gts: Sequence[GTInstances],
    assignment: Assignment,
    out_size: tuple[int, int],
    *,
    soft: bool = False,
    on_input_grid: bool = False,
    grid_stride: int = 4,
) -> MaskTargets:
    """Crop every positive's GT mask to its predicted box on the prediction grid.

    Args:
        det: the batch's detector outputs.
        gts: B ground truths.
        assignment: positives from :func:`assign`.
        out_size: (Sh, Sw) of the predicted mask logits.
        soft: soft targets (see :func:`crop_masks`).
        on_input_grid: predictions live on the stride-``grid_stride`` input grid (non-RoI baseline)
            rather than on each box's RoI grid; the crop box is then the whole grid.
    """
    boxes_all = pred_boxes_original(det)
    grid_boxes = input_grid_boxes(det, out_size, grid_stride).to(boxes_all.device) if on_input_grid else None
    masks, areas = [], []
    order = []
    for b, gt in enumerate(gts):
        sel = torch.nonzero(assignment.batch_idx == b).flatten()
        if sel.numel() == 0:
            continue
        order.append(sel)
        g = assignment.gt_idx[sel]
        gt_areas = gt.masks.flatten(1).sum(1).to(boxes_all.device, torch.float32)  # [N] pixels
        if grid_boxes is not None:
            boxes = grid_boxes[b][None].expand(sel.numel(), 4)
        else:
            boxes = boxes_all[b, assignment.query_idx[sel]]
        masks.append(crop_masks(gt.masks, boxes, g, out_size, soft=soft))
        full = gt_areas[g.to(gt_areas.device)]
        cell = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6) / (out_size[0] * out_size[1])
        areas.append(full / cell)
    dev = boxes_all.device
    if not order:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return MaskTargets(
            batch_idx=z,
            query_idx=z,
            gt_idx=z,
            masks=torch.zeros((0, *out_size), device=dev),
            gt_area=torch.zeros(0, device=dev),
        )
    idx = torch.cat(order)
    return MaskTargets(
        batch_idx=assignment.batch_idx[idx],
        query_idx=assignment.query_idx[idx],
        gt_idx=assignment.gt_idx[idx],
        masks=torch.cat(masks),
        gt_area=torch.cat(areas),
    )
