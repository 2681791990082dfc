"""The mask network's training criterion: assignment → cropped targets → losses, for one batch.

:class:`MaskCriterion` is the single entry point a trainer calls::

    criterion = MaskCriterion(loss_cfg=LossConfig(), assign_cfg=AssignConfig(),
                              class_to_category=preset.class_to_category)
    losses = criterion(masknet(det), det, gts)   # dict of scalars; losses["loss"] is the total
    losses["loss"].backward()

It reads only tensors (``DetectorOutput``, the mask network's output, ``GTInstances``) and never a
detector. Steps: :func:`~mfdetr.masknet.targets.assign` GTs to the K predicted boxes,
:func:`~mfdetr.masknet.targets.build_mask_targets` crops their masks to the boxes on the prediction
grid, :func:`~mfdetr.masknet.losses.mask_losses` computes BCE + Dice on sampled points and the mask-IoU
L2 loss (appendix A, eq. 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.masknet.losses import LossConfig, mask_iou, mask_losses
from mfdetr.masknet.targets import AssignConfig, assign, build_mask_targets, first_queries, is_input_grid_output

__all__ = ["AssignConfig", "LossConfig", "MaskCriterion"]


class _MaskOutput(Protocol):
    mask_logits: Tensor
    iou_pred: Tensor | None


class MaskCriterion(nn.Module):
    """Whole mask loss of a batch (no parameters).

    Args:
        loss_cfg: point sampling and loss weights.
        assign_cfg: GT-to-box assignment and target cropping.
        class_to_category: the detector's class slot → category id map (needed only by the Hungarian
            ``"detr"`` cost).
        generator: optional RNG for the point sampling (reproducible tests).
    """

    def __init__(self, *, loss_cfg: LossConfig | None = None, assign_cfg: AssignConfig | None = None,
                 class_to_category: Sequence[int] | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.loss_cfg = loss_cfg if loss_cfg is not None else LossConfig()
        self.assign_cfg = assign_cfg if assign_cfg is not None else AssignConfig()
        self.class_to_category = tuple(class_to_category) if class_to_category is not None else None
        self.generator = generator

    def forward(self, out: _MaskOutput, det: DetectorOutput, gts: Sequence[GTInstances], *,
                num_masks: float | None = None) -> dict[str, Tensor]:
        """Losses of a batch.

        Args:
            out: mask network output — ``mask_logits`` [B, K', Sh, Sw], ``iou_pred`` [B, K'] or ``None``
                (K' ≤ K: the first K' queries of ``det``; ``roi=False`` marks stride-4 input-grid masks).
            det: the detector outputs ``out`` was computed from.
            gts: B ground truths (original pixel frame).
            num_masks: loss normaliser (default: positives in this batch, at least 1); pass the mean over
                data-parallel workers to normalise globally.

        Returns:
            ``loss_mask_bce``, ``loss_mask_dice``, ``loss_mask_iou`` and their sum ``loss`` (weighted,
            attached to the graph; exact zeros when there is no positive), plus detached statistics
            ``num_pos`` (positives) and ``pos_mask_iou`` (mean IoU of the thresholded predictions with
            their targets on the grid, 0 without positives).
        """
        logits = out.mask_logits
        if logits.dim() != 4 or int(logits.shape[0]) != det.batch_size or int(logits.shape[1]) > det.num_queries:
            raise ValueError(f"mask_logits must be [B,K',Sh,Sw] with B={det.batch_size}, K' ≤ {det.num_queries}, "
                             f"got {tuple(logits.shape)}")
        det = first_queries(det, int(logits.shape[1]))  # the network may segment only the top K' queries
        grid = (int(logits.shape[-2]), int(logits.shape[-1]))
        a = assign(det, gts, self.assign_cfg, self.class_to_category)
        t = build_mask_targets(det, gts, a, grid, soft=self.assign_cfg.soft_targets,
                               on_input_grid=is_input_grid_output(out))
        dev = logits.device
        bi, qi = t.batch_idx.to(dev), t.query_idx.to(dev)
        pos_logits = logits[bi, qi]
        iou_pred = out.iou_pred[bi, qi] if out.iou_pred is not None else None
        losses = mask_losses(pos_logits, t.masks.to(dev), self.loss_cfg, iou_pred=iou_pred,
                             gt_area=t.gt_area.to(dev), num_masks=num_masks, generator=self.generator)
        if len(t) == 0:
            # keep every output in the graph (zero gradient) so data-parallel reducers see all params
            losses["loss"] = losses["loss"] + logits.float().sum() * 0.0
            if out.iou_pred is not None:
                losses["loss"] = losses["loss"] + out.iou_pred.float().sum() * 0.0
        with torch.no_grad():
            losses["num_pos"] = torch.tensor(float(len(t)), device=dev)
            losses["pos_mask_iou"] = (mask_iou(pos_logits.detach(), t.masks.to(dev)).mean() if len(t)
                                      else torch.zeros((), device=dev))
        return losses
