"""Which GT instance each predicted box learns (the training targets' first half; the masks cropped for
them are :mod:`mfdetr.masknet.targets`').

Two assignments (:class:`AssignConfig.method`):

- ``"box_iou"`` (default) — Mask R-CNN's mask branch: every predicted box takes its best-IoU non-crowd
  GT box if that IoU ≥ ``iou_threshold`` (0.5). Several boxes may learn the same GT.
- ``"hungarian"`` — one-to-one matching (scipy ``linear_sum_assignment``) on DINO's matcher cost
  (focal class cost 2 + L1 box 5 + GIoU 2 on the frozen logits/boxes) or on −IoU; pairs below
  ``hungarian_min_iou`` are dropped.

Why box IoU is the default: the detector is frozen, so its set prediction (one-to-one matching,
duplicate suppression by score) is already done and cannot change. What the mask network must learn
is "segment the object inside this box", and at test time it is asked that for **all** K boxes —
duplicates and loose boxes are evaluated too, ranked by the detector's score (eq. 2/13). Box-IoU
assignment trains exactly that question on every box that covers an object well, giving several
positives per GT (more supervision per cached image, more box jitter as augmentation, as Mask R-CNN
does with its RoIs), whereas Hungarian matching trains one box per GT and also pairs low-quality boxes
with GTs they barely touch whenever the detector misses an object. Hungarian is kept for comparison.

Crowd regions are never positives: only non-crowd GTs are assigned, and a predicted box whose area
is covered for at least ``crowd_threshold`` by crowd-mask pixels is *ignored* (no target at all),
whatever its IoU with non-crowd GTs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.errors import MfdetrError
from mfdetr.layers import focal_class_cost
from mfdetr.ops.boxes import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, clip_boxes, generalized_box_iou


@dataclass
class AssignConfig:
    """How GT instances are assigned to predicted boxes and how their masks are cropped.

    Args:
        method: ``"box_iou"`` (Mask R-CNN mask branch, default — see module docstring) or
            ``"hungarian"`` (one-to-one).
        iou_threshold: box-IoU assignment: minimum IoU with the best non-crowd GT box (Mask R-CNN 0.5).
        crowd_threshold: a predicted box whose area is covered at least this much by crowd-mask pixels
            is ignored (never a positive).
        hungarian_cost: ``"detr"`` = class (focal) + L1 + GIoU cost as DINO's matcher, ``"iou"`` = −IoU.
        cost_class, cost_bbox, cost_giou: weights of the ``"detr"`` cost (DINO: 2, 5, 2).
        hungarian_min_iou: matched pairs with a lower box IoU are dropped (0 keeps all, as DETR).
        soft_targets: keep RoIAligned mask values in [0, 1] instead of thresholding at 0.5.
        max_positives_per_image: keep at most this many positives per image, sampled uniformly
            among the assigned ones (Mask R-CNN's mask-branch sampling), seeded per (run seed, step,
            image id) by :func:`~mfdetr.masknet.positives.cap_positives`; 0 or ``None`` = no cap.
    """

    method: Literal["box_iou", "hungarian"] = "box_iou"
    iou_threshold: float = 0.5
    crowd_threshold: float = 0.5
    hungarian_cost: Literal["detr", "iou"] = "detr"
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    hungarian_min_iou: float = 0.0
    soft_targets: bool = False
    max_positives_per_image: int | None = 0

    def __post_init__(self) -> None:
        cap = self.max_positives_per_image
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"max_positives_per_image must be an integer ≥ 0 (0 = no cap), got {cap!r}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if not 0.0 < self.crowd_threshold <= 1.0:
            raise ValueError(f"crowd_threshold must be in (0, 1], got {self.crowd_threshold}")


@dataclass
class Assignment:
    """Positive (image, query, GT) triples of a batch, plus ignored queries.

    - ``batch_idx``, ``query_idx``, ``gt_idx`` [P] int64 — positive ``p`` is query ``query_idx[p]`` of
      image ``batch_idx[p]``, which learns GT ``gt_idx[p]`` of that image's :class:`GTInstances`.
    - ``ignored`` [B, K] bool — queries that must get no loss at all (mostly crowd).
    """

    batch_idx: Tensor
    query_idx: Tensor
    gt_idx: Tensor
    ignored: Tensor

    def __len__(self) -> int:
        return int(self.batch_idx.numel())


def pred_boxes_original(det: DetectorOutput) -> Tensor:
    """[B, K, 4] predicted boxes as absolute xyxy in **original** image pixels (not clamped).

    The normalised cxcywh box is relative to the unpadded input image; the resize is uniform, so the
    same normalised box times the original size (w0, h0) is the box in the original image.
    """
    xyxy = box_cxcywh_to_xyxy(det.boxes.float())
    hw = det.orig_hw.to(device=xyxy.device, dtype=xyxy.dtype)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
    return xyxy * scale[:, None, :]


def box_crowd_fraction(crowd: Tensor, boxes: Tensor) -> Tensor:
    """Fraction of each box's area covered by ``True`` pixels of ``crowd``.

    Args:
        crowd: [H, W] bool, union of the crowd masks of one image.
        boxes: [K, 4] xyxy in pixels of that image (clamped and rounded outwards to whole pixels).

    Returns:
        [K] float in [0, 1]; 0 for boxes without area inside the image.
    """
    h, w = crowd.shape
    ii = torch.zeros((h + 1, w + 1), dtype=torch.float64, device=crowd.device)
    ii[1:, 1:] = crowd.to(torch.float64).cumsum(0).cumsum(1)
    b = clip_boxes(boxes.to(crowd.device, torch.float64), (h, w))
    x0, y0 = b[:, 0].floor().long(), b[:, 1].floor().long()
    x1, y1 = b[:, 2].ceil().long(), b[:, 3].ceil().long()
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    area = ((x1 - x0) * (y1 - y0)).to(torch.float64)
    return torch.where(area > 0, inside / area.clamp(min=1), torch.zeros_like(area)).to(boxes.dtype)


def _ignored_by_crowd(gt: GTInstances, boxes: Tensor, thr: float) -> Tensor:
    crowd = gt.iscrowd.bool()
    if not bool(crowd.any()):
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    union = gt.masks[crowd.to(gt.masks.device)].any(dim=0)
    return (box_crowd_fraction(union, boxes) >= thr).to(boxes.device)


def _category_to_slot(class_to_category: Sequence[int], device: torch.device) -> Tensor:
    """Lookup table category id → class slot (−1 for ids without a slot)."""
    top = max(class_to_category) if len(class_to_category) else 0
    table = torch.full((top + 1,), -1, dtype=torch.long)
    for slot, cat in enumerate(class_to_category):
        if cat > 0 and table[cat] < 0:
            table[cat] = slot
    return table.to(device)


def _hungarian_cost(
    det: DetectorOutput,
    b: int,
    boxes: Tensor,
    gt: GTInstances,
    keep_gt: Tensor,
    cfg: AssignConfig,
    class_to_category: Sequence[int] | None,
) -> Tensor:
    """[K, G] matching cost between the queries of image ``b`` and its kept (non-crowd) GTs."""
    gt_boxes = gt.boxes[keep_gt].to(boxes.device, boxes.dtype)
    iou = box_iou(boxes, gt_boxes)
    if cfg.hungarian_cost == "iou":
        return -iou
    if class_to_category is None:
        raise MfdetrError("assign.hungarian_cost='detr' needs the detector's class_to_category map")
    h0, w0 = gt.orig_hw
    norm = torch.tensor([w0, h0, w0, h0], dtype=boxes.dtype, device=boxes.device)
    # L1 on normalised cxcywh, as DINO's matcher
    cost_bbox = torch.cdist(box_xyxy_to_cxcywh(boxes / norm), box_xyxy_to_cxcywh(gt_boxes / norm), p=1)
    cost_giou = -generalized_box_iou(boxes, gt_boxes)
    # DINO's focal-style class cost on the frozen logits (alpha 0.25, gamma 2).
    prob = det.logits[b].float().sigmoid()
    slots = _category_to_slot(class_to_category, prob.device)
    labels = gt.labels[keep_gt].to(prob.device).long()
    slot = torch.where(labels < slots.numel(), slots[labels.clamp(max=slots.numel() - 1)], -1)
    p = prob[:, slot.clamp(min=0)]
    cost_class = torch.where(slot[None, :] >= 0, focal_class_cost(p, alpha=0.25, gamma=2.0), torch.zeros_like(p))
    return cfg.cost_bbox * cost_bbox + cfg.cost_class * cost_class + cfg.cost_giou * cost_giou


@torch.no_grad()
def assign(
    det: DetectorOutput, gts: Sequence[GTInstances], cfg: AssignConfig, class_to_category: Sequence[int] | None = None
) -> Assignment:
    """Assign GT instances to the K predicted boxes of every image (see module docstring).

    Args:
        det: detector outputs of B images (``boxes`` normalised cxcywh, ``orig_hw``).
        gts: B ground truths, original pixel frame.
        cfg: assignment config.
        class_to_category: class slot → category id of the detector (Hungarian ``"detr"`` cost only).
    """
    if len(gts) != det.batch_size:
        raise ValueError(f"got {len(gts)} GT entries for a batch of {det.batch_size} images")
    boxes_all = pred_boxes_original(det)
    dev = boxes_all.device
    bi, qi, gi, ignored = [], [], [], []
    for b, gt in enumerate(gts):
        boxes = clip_boxes(boxes_all[b], (int(gt.orig_hw[0]), int(gt.orig_hw[1])))
        ign = (
            _ignored_by_crowd(gt, boxes, cfg.crowd_threshold)
            if len(gt)
            else torch.zeros(boxes.shape[0], dtype=torch.bool, device=dev)
        )
        ignored.append(ign)
        keep_gt = torch.nonzero(~gt.iscrowd.bool().cpu()).flatten()
        if keep_gt.numel() == 0 or boxes.shape[0] == 0:
            continue
        if cfg.method == "box_iou":
            iou = box_iou(boxes, gt.boxes[keep_gt].to(dev, boxes.dtype))
            best, arg = iou.max(dim=1)
            pos = (best >= cfg.iou_threshold) & (best > 0) & ~ign
            q = torch.nonzero(pos).flatten()
            g = keep_gt.to(dev)[arg[q]]
        else:
            cost = _hungarian_cost(det, b, boxes, gt, keep_gt, cfg, class_to_category)
            cost = torch.where(ign[:, None], torch.full_like(cost, 1e6), cost)
            rows, cols = linear_sum_assignment(cost.nan_to_num(1e6, 1e6, -1e6).cpu().numpy())
            q = torch.as_tensor(rows, dtype=torch.long, device=dev)
            c = torch.as_tensor(cols, dtype=torch.long, device=dev)
            iou = box_iou(boxes[q], gt.boxes[keep_gt].to(dev, boxes.dtype)[c]).diagonal()
            ok = ~ign[q] & (iou >= cfg.hungarian_min_iou)
            q, g = q[ok], keep_gt.to(dev)[c[ok]]
        bi.append(torch.full_like(q, b))
        qi.append(q)
        gi.append(g)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    return Assignment(
        batch_idx=torch.cat(bi) if bi else empty,
        query_idx=torch.cat(qi) if qi else empty,
        gt_idx=torch.cat(gi) if gi else empty,
        ignored=torch.stack(ignored) if ignored else torch.zeros(0, 0, dtype=torch.bool, device=dev),
    )
