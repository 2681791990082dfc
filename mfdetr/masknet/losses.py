"""Mask losses of the mask network: BCE + Dice on sampled points (appendix A) and the mask-IoU L2 loss.

- **Mask loss on sampled pixel points** (appendix A, after implicit PointRend / Mask2Former): for each
  positive, sample ``k·N`` uniformly random points on its S×S logit map, keep the ``β·N`` most
  uncertain ones (smallest ``|logit|`` of the prediction, detached) and add ``(1−β)·N`` fresh random
  points; logits and targets are read at those points by bilinear ``grid_sample``. The appendix notes
  that this cuts the supervised points by 75 %, hence the default ``N = S·S / 4`` (256 at S = 32);
  ``k = 3`` and ``β = 0.75`` are Mask2Former's values (the paper gives none). ``point_sampling=False``
  uses every grid cell instead.
- **BCE + Dice**: sigmoid cross-entropy averaged over a mask's points plus the Dice loss
  ``1 − (2·Σpt + 1) / (Σp + Σt + 1)``; each summed over masks and divided by the number of positives
  (Mask2Former's normalisation). Weights 1 : 1 (the paper trains only masks, so only their ratio
  against the IoU loss and the learning rate matter; Mask2Former weighs BCE and Dice equally too).
- **Mask scoring** (eq. 12-13, after Mask Scoring R-CNN): L2 between the predicted IoU and the IoU of
  the thresholded predicted mask (logit > 0) with the target mask on the S×S grid, a detached target.
  As in Mask Scoring R-CNN, the target's area counts the **whole** GT mask (also the part outside the
  predicted box, which the box cannot cover), so the predicted IoU estimates the IoU with the real
  instance — the quantity COCO evaluation scores. Weight 1 (Mask Scoring R-CNN's ``MASKIOU_LOSS_WEIGHT``).

Everything is computed in float32 (AMP-safe; float64 inputs stay float64) and is finite with zero positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossConfig",
    "dice_loss",
    "mask_iou",
    "mask_losses",
    "point_sample",
    "sample_points",
    "sigmoid_bce_loss",
]


@dataclass
class LossConfig:
    """Loss settings (a ``[loss]`` table of a training recipe).

    Args:
        point_sampling: importance-sampled points (appendix A) instead of the full S×S grid.
        num_points: N points per mask; ``None`` = S·S/4 (the appendix's 75 % fewer supervised points).
        oversample_ratio: k > 1, candidates drawn before picking uncertain ones (Mask2Former: 3).
        importance_sample_ratio: β ∈ [0, 1], share of N taken from the most uncertain candidates (0.75).
        bce_weight, dice_weight: weights of the two mask losses (1, 1).
        iou_weight: weight of the mask-scoring L2 loss (1); unused when the network predicts no IoU.
        iou_target_full_gt: count the whole GT mask (also outside the box) in the IoU target's union.
    """

    point_sampling: bool = True
    num_points: int | None = None
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_target_full_gt: bool = True

    def __post_init__(self) -> None:
        if self.oversample_ratio < 1.0:
            raise ValueError(f"oversample_ratio must be ≥ 1, got {self.oversample_ratio}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        if self.num_points is not None and self.num_points < 1:
            raise ValueError(f"num_points must be ≥ 1, got {self.num_points}")
        for name in ("bce_weight", "dice_weight", "iou_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")

    def points_for(self, grid_hw: tuple[int, int]) -> int:
        """N for a grid of ``grid_hw`` cells."""
        return self.num_points if self.num_points is not None else max(1, grid_hw[0] * grid_hw[1] // 4)


def _float(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 when it already is (half precision never reaches a loss)."""
    return t if t.dtype == torch.float64 else t.float()


def point_sample(inp: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``inp`` [P, C, H, W] at ``coords`` [P, N, 2] (x, y in [0, 1]) → [P, C, N].

    Coordinates are relative to the map's extent (align_corners=False): (0.5/W, 0.5/H) is the centre
    of the top-left cell. Points in the outer half-cell read the edge cell (``padding_mode="border"``);
    zero padding (PointRend's default) would pull both logits and targets towards 0 there, teaching a
    box-filling object that its box edges are half background and making those points look uncertain.
    """
    out = F.grid_sample(
        inp,
        (2.0 * coords.to(inp.dtype) - 1.0)[:, :, None, :],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[..., 0]


@torch.no_grad()
def sample_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance-sampled point coordinates (appendix A; PointRend's uncertainty sampling).

    Args:
        logits: [P, 1, H, W] mask logits (the uncertainty is ``−|logit|`` at the points, detached).
        num_points: N.
        oversample_ratio: k; ``int(k·N)`` random candidates.
        importance_sample_ratio: β; ``int(β·N)`` most uncertain candidates are kept, the rest random.
        generator: optional RNG for reproducible sampling.

    Returns:
        [P, N, 2] coordinates (x, y) in [0, 1].
    """
    p = int(logits.shape[0])
    dev = logits.device
    n_unc = int(importance_sample_ratio * num_points)
    n_rand = num_points - n_unc
    parts = []
    if n_unc > 0:
        n_cand = max(int(oversample_ratio * num_points), n_unc)
        cand = torch.rand(p, n_cand, 2, device=dev, generator=generator)
        unc = -point_sample(_float(logits), cand)[:, 0].abs()
        idx = unc.topk(n_unc, dim=1).indices
        parts.append(torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2)))
    if n_rand > 0:
        parts.append(torch.rand(p, n_rand, 2, device=dev, generator=generator))
    return torch.cat(parts, dim=1)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """[P, N] logits and targets in [0, 1] → [P] sigmoid cross-entropy averaged over the N points."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """[P, N] logits and targets in [0, 1] → [P] Dice loss ``1 − (2Σpt + 1)/(Σp + Σt + 1)``."""
    prob = logits.sigmoid()
    num = 2.0 * (prob * targets).sum(dim=1)
    den = prob.sum(dim=1) + targets.sum(dim=1)
    return 1.0 - (num + 1.0) / (den + 1.0)


@torch.no_grad()
def mask_iou(logits: Tensor, targets: Tensor, gt_area: Tensor | None = None) -> Tensor:
    """IoU target of the mask-scoring head on the prediction grid (detached).

    Args:
        logits: [P, H, W] predicted mask logits (foreground where logit > 0, i.e. probability > 0.5).
        targets: [P, H, W] target masks in [0, 1] (foreground where ≥ 0.5).
        gt_area: [P] area of the whole GT mask in grid cells; when given, the union uses
            ``max(gt_area, target area)`` so GT pixels outside the box count as missed.

    Returns:
        [P] IoU in [0, 1] (0 where the union is empty).
    """
    pred = (logits.float() > 0).flatten(1)
    tgt = (targets.float() >= 0.5).flatten(1)
    inter = (pred & tgt).sum(1).float()
    area_t = tgt.sum(1).float()
    if gt_area is not None:
        area_t = torch.maximum(area_t, gt_area.float().to(area_t.device))
    union = pred.sum(1).float() + area_t - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-6), torch.zeros_like(union))


def mask_losses(
    logits: Tensor,
    targets: Tensor,
    cfg: LossConfig,
    *,
    iou_pred: Tensor | None = None,
    gt_area: Tensor | None = None,
    num_masks: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """BCE + Dice (+ mask-IoU L2) losses of P positive masks.

    Args:
        logits: [P, H, W] predicted mask logits of the positives.
        targets: [P, H, W] their targets in [0, 1].
        cfg: loss config.
        iou_pred: [P] predicted mask IoU (eq. 12), or ``None`` without mask scoring.
        gt_area: [P] whole-GT areas in grid cells (see :func:`mask_iou`).
        num_masks: normaliser (default ``max(P, 1)``; pass a global count under data parallelism).
        generator: RNG for point sampling.

    Returns:
        ``{"loss_mask_bce", "loss_mask_dice", "loss_mask_iou", "loss"}`` — weighted scalars and their sum;
        exact zeros (still attached to ``logits``' graph) when P = 0.
    """
    p = int(logits.shape[0])
    norm = float(num_masks) if num_masks is not None else float(max(p, 1))
    norm = max(norm, 1.0)
    x = _float(logits)
    zero = x.sum() * 0.0
    if p == 0:
        z_iou = zero + (_float(iou_pred).sum() * 0.0 if iou_pred is not None else 0.0)
        return {"loss_mask_bce": zero, "loss_mask_dice": zero, "loss_mask_iou": z_iou, "loss": zero + z_iou}
    t = targets.to(x.dtype)
    if cfg.point_sampling:
        n = cfg.points_for((int(x.shape[-2]), int(x.shape[-1])))
        coords = sample_points(x[:, None], n, cfg.oversample_ratio, cfg.importance_sample_ratio, generator)
        px = point_sample(x[:, None], coords)[:, 0]
        pt = point_sample(t[:, None], coords)[:, 0]
    else:
        px, pt = x.flatten(1), t.flatten(1)
    bce = sigmoid_bce_loss(px, pt).sum() / norm * cfg.bce_weight
    dice = dice_loss(px, pt).sum() / norm * cfg.dice_weight
    if iou_pred is not None:
        tgt_iou = mask_iou(x, t, gt_area if cfg.iou_target_full_gt else None)
        l_iou = (_float(iou_pred) - tgt_iou.to(x.dtype)).pow(2).sum() / norm * cfg.iou_weight
    else:
        l_iou = zero
    return {"loss_mask_bce": bce, "loss_mask_dice": dice, "loss_mask_iou": l_iou, "loss": bce + dice + l_iou}
