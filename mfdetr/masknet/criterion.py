"""The mask network's training criterion: assignment → cropped targets → losses, for one batch.

:class:`MaskCriterion` is the single entry point a trainer calls::

    criterion = MaskCriterion(loss_cfg=LossConfig(), assign_cfg=AssignConfig(),
                              class_to_category=preset.class_to_category)
    losses = criterion(masknet(det), det, gts)   # dict of scalars; losses["loss"] is the total
    losses["loss"].backward()

Training runs MaskNet on the positives only (:mod:`mfdetr.masknet.positives`)::

    train_model = PositivesOnly(masknet, criterion)
    losses = criterion(train_model(det, gts, step=step), det, gts)   # the same losses and gradients

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
from mfdetr.masknet.positives import cap_positives, cap_seed
from mfdetr.masknet.targets import (
    AssignConfig,
    Assignment,
    assign,
    build_mask_targets,
    first_queries,
    is_input_grid_output,
)

__all__ = ["AssignConfig", "LossConfig", "MaskCriterion"]


class _MaskOutput(Protocol):
    mask_logits: Tensor
    iou_pred: Tensor | None


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def _rows(selected: tuple[Tensor, Tensor], bi: Tensor, qi: Tensor) -> Tensor:
    """Row of each (image ``bi``, query ``qi``) pair in a selection of queries (an error if absent)."""
    sb, sq = selected
    if bi.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=sb.device)
    k = int(max(int(sq.max()) if sq.numel() else 0, int(qi.max()))) + 1
    nb = int(max(int(sb.max()) if sb.numel() else 0, int(bi.max()))) + 1
    table = torch.full((nb * k,), -1, dtype=torch.long, device=sb.device)
    table[sb * k + sq] = torch.arange(sb.numel(), device=sb.device)
    rows = table[bi * k + qi]
    if bool((rows < 0).any()):
        raise ValueError("the output does not hold every positive query of its assignment")
    return rows


class MaskCriterion(nn.Module):
    """Whole mask loss of a batch (no parameters).

    Args:
        loss_cfg: point sampling and loss weights.
        assign_cfg: GT-to-box assignment and target cropping.
        class_to_category: the detector's class slot → category id map (needed only by the Hungarian
            ``"detr"`` cost).
        generator: optional RNG for the point sampling (reproducible tests).
        seed: the run seed the positive cap (``assign_cfg.max_positives_per_image``) draws from.
        global_normaliser: under an initialised process group of several ranks, normalise by the
            positives count averaged over ranks (an all-reduce: every rank must call the criterion
            at each step, as data-parallel training does); else by this batch's count.
    """

    def __init__(
        self,
        *,
        loss_cfg: LossConfig | None = None,
        assign_cfg: AssignConfig | None = None,
        class_to_category: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        global_normaliser: bool = True,
    ) -> None:
        super().__init__()
        self.loss_cfg = loss_cfg if loss_cfg is not None else LossConfig()
        self.assign_cfg = assign_cfg if assign_cfg is not None else AssignConfig()
        self.class_to_category = tuple(class_to_category) if class_to_category is not None else None
        self.generator = generator
        self.seed = int(seed)
        self.global_normaliser = global_normaliser

    def assign_targets(self, det: DetectorOutput, gts: Sequence[GTInstances], *, step: int = 0) -> Assignment:
        """The positives of a batch: :func:`assign`, then the per-image cap (seeded by the criterion's
        ``seed``, ``step`` and each GT's ``image_id``). Reads only ``det``'s boxes/logits and the GT."""
        a = assign(det, gts, self.assign_cfg, self.class_to_category)
        cap = self.assign_cfg.max_positives_per_image
        if cap:
            a = cap_positives(a, cap, [cap_seed(self.seed, step, gt.image_id) for gt in gts])
        return a

    def normaliser(self, num_pos: int, device: torch.device) -> float | None:
        """``num_masks`` of the losses: the positives count averaged over data-parallel ranks (at least 1),
        or ``None`` (this batch's count) in a single process."""
        world = _world_size() if self.global_normaliser else 1
        if world == 1:
            return None
        t = torch.tensor([float(num_pos)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return max(float(t.item()) / world, 1.0)

    def forward(
        self,
        out: _MaskOutput,
        det: DetectorOutput,
        gts: Sequence[GTInstances],
        *,
        num_masks: float | None = None,
        step: int = 0,
    ) -> dict[str, Tensor]:
        """Losses of a batch.

        Args:
            out: mask network output — either all queries: ``mask_logits`` [B, K', Sh, Sw], ``iou_pred``
                [B, K'] or ``None`` (K' ≤ K: the first K' queries of ``det``); or a selection of queries
                (``out.selected`` = (batch_idx, query_idx) [P], ``mask_logits`` [P, Sh, Sw], ``iou_pred``
                [P]) made for ``out.assignment``, which every positive must be in. ``roi=False`` marks
                stride-4 input-grid masks. An ``out.assignment`` is used as is (no assignment here).
            det: the detector outputs ``out`` was computed from.
            gts: B ground truths (original pixel frame).
            num_masks: loss normaliser (default: positives in this batch, or their mean over
                data-parallel ranks, at least 1; see ``global_normaliser``).
            step: training step (seeds the positive cap when this call assigns).

        Returns:
            ``loss_mask_bce``, ``loss_mask_dice``, ``loss_mask_iou`` and their sum ``loss`` (weighted,
            attached to the graph; exact zeros when there is no positive), plus detached statistics
            ``num_pos`` (positives), ``pos_per_image`` and ``pos_mask_iou`` (mean IoU of the
            thresholded predictions with their targets on the grid, 0 without positives).
        """
        logits = out.mask_logits
        selected = getattr(out, "selected", None)
        a = getattr(out, "assignment", None)
        if selected is None:
            if logits.dim() != 4 or int(logits.shape[0]) != det.batch_size or int(logits.shape[1]) > det.num_queries:
                raise ValueError(
                    f"mask_logits must be [B,K',Sh,Sw] with B={det.batch_size}, K' ≤ "
                    f"{det.num_queries}, got {tuple(logits.shape)}"
                )
            det = first_queries(det, int(logits.shape[1]))  # the network may segment only the top K' queries
        elif a is None:
            raise ValueError("an output holding selected queries must carry the assignment they were selected for")
        if a is None:
            a = self.assign_targets(det, gts, step=step)
        grid = (int(logits.shape[-2]), int(logits.shape[-1]))
        t = build_mask_targets(
            det, gts, a, grid, soft=self.assign_cfg.soft_targets, on_input_grid=is_input_grid_output(out)
        )
        dev = logits.device
        bi, qi = t.batch_idx.to(dev), t.query_idx.to(dev)
        if selected is None:
            pos_logits = logits[bi, qi]
            iou_pred = out.iou_pred[bi, qi] if out.iou_pred is not None else None
        else:
            rows = _rows((selected[0].to(dev), selected[1].to(dev)), bi, qi)
            pos_logits = logits[rows]
            iou_pred = out.iou_pred[rows] if out.iou_pred is not None else None
        if num_masks is None:
            num_masks = self.normaliser(len(t), dev)
        losses = mask_losses(
            pos_logits,
            t.masks.to(dev),
            self.loss_cfg,
            iou_pred=iou_pred,
            gt_area=t.gt_area.to(dev),
            num_masks=num_masks,
            generator=self.generator,
        )
        if len(t) == 0:
            # keep every output in the graph (zero gradient) so data-parallel reducers see all params
            losses["loss"] = losses["loss"] + logits.float().sum() * 0.0
            if out.iou_pred is not None:
                losses["loss"] = losses["loss"] + out.iou_pred.float().sum() * 0.0
        with torch.no_grad():
            losses["num_pos"] = torch.tensor(float(len(t)), device=dev)
            losses["pos_per_image"] = torch.tensor(float(len(t)) / max(det.batch_size, 1), device=dev)
            losses["pos_mask_iou"] = (
                mask_iou(pos_logits.detach(), t.masks.to(dev)).mean() if len(t) else torch.zeros((), device=dev)
            )
        return losses
