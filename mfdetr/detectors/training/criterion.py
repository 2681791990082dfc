"""DETR set-prediction loss with a focal classification term (Deformable DETR / DINO ``SetCriterion``).

For one set of predictions (a decoder layer, or the two-stage encoder proposals), after Hungarian
matching (:class:`~mfdetr.detectors.training.matcher.HungarianMatcher`):

- ``loss_ce``: sigmoid focal loss (α = 0.25, γ = 2) against one-hot targets (unmatched queries: all
  zeros), summed and divided by the number of GT boxes ``N`` (the official
  ``sigmoid_focal_loss(...).mean(1).sum() / N · Q``);
- ``loss_bbox``: L1 on normalised cxcywh of matched pairs / ``N``;
- ``loss_giou``: ``1 − GIoU`` of matched pairs / ``N``.

The total is ``Σ_sets (w_ce · loss_ce + w_bbox · loss_bbox + w_giou · loss_giou)`` over the final
layer, every earlier decoder layer (auxiliary losses) and the encoder proposals (DINO's
``interm_outputs``), each matched separately. DINO's weights: 1, 5, 2. With denoising queries,
every layer's denoising slots add the same three terms (:meth:`SetCriterion.dn_losses`, logged as
``loss_dn``). ``N`` is at least 1, so a batch without objects still gives a finite loss (pure
background focal loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.detectors.training.denoising import DenoisingQueries
from mfdetr.detectors.training.forward import TrainForward
from mfdetr.detectors.training.matcher import HungarianMatcher
from mfdetr.ops import box_cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al. 2017, eq. 5) of logits and {0, 1} targets, same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion:
    """Matching + losses over every prediction set of a :class:`TrainForward`.

    Args:
        matcher: the Hungarian matcher.
        weight_ce, weight_bbox, weight_giou: loss weights.
        alpha, gamma: focal-loss parameters.
        aux: add the losses of every non-final decoder layer.
        enc: add the loss of the two-stage encoder proposals.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        aux: bool = True,
        enc: bool = True,
    ) -> None:
        self.matcher = matcher
        self.weight_ce, self.weight_bbox, self.weight_giou = weight_ce, weight_bbox, weight_giou
        self.alpha, self.gamma = alpha, gamma
        self.aux, self.enc = aux, enc

    def set_losses(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Losses of one prediction set: logits [B, Q, C], boxes [B, Q, 4] cxcywh."""
        matches = self.matcher(logits.detach(), boxes.detach(), targets)
        bsz, nq, nc = logits.shape
        onehot = torch.zeros_like(logits)
        src_boxes, tgt_boxes = [], []
        for b, (qi, ti) in enumerate(matches):
            qi, ti = qi.to(logits.device), ti.to(logits.device)
            onehot[b, qi, targets[b]["labels"][ti]] = 1.0
            src_boxes.append(boxes[b, qi])
            tgt_boxes.append(targets[b]["boxes"][ti])
        focal = sigmoid_focal_loss(logits.float(), onehot.float(), alpha=self.alpha, gamma=self.gamma)
        loss_ce = focal.sum() / num_boxes
        src = torch.cat(src_boxes).float()
        tgt = torch.cat(tgt_boxes).float()
        if src.numel():
            return {"loss_ce": loss_ce, **_box_losses(src, tgt, num_boxes)}
        zero = boxes.sum() * 0.0  # no object in the batch: keep the graph connected, value 0
        return {"loss_ce": loss_ce, "loss_bbox": zero, "loss_giou": zero}

    def weighted(self, parts: dict[str, Tensor]) -> Tensor:
        """``w_ce · loss_ce + w_bbox · loss_bbox + w_giou · loss_giou`` of one prediction set."""
        return (
            self.weight_ce * parts["loss_ce"]
            + self.weight_bbox * parts["loss_bbox"]
            + self.weight_giou * parts["loss_giou"]
        )

    def __call__(self, out: TrainForward, targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """Total weighted loss and a log dict (``loss``, final-layer terms, ``loss_enc``, ``loss_aux``).

        ``targets``: per image ``{"labels": [N] head slots, "boxes": [N, 4] normalised cxcywh}``.
        """
        num_boxes = max(float(sum(int(t["labels"].numel()) for t in targets)), 1.0)
        sets: list[tuple[str, Tensor, Tensor]] = [("final", out.layer_logits[-1], out.layer_boxes[-1])]
        if self.aux:
            sets += [
                (f"aux{i}", lg, bx)
                for i, (lg, bx) in enumerate(zip(out.layer_logits[:-1], out.layer_boxes[:-1], strict=True))
            ]
        if self.enc:
            sets.append(("enc", out.enc_logits, out.enc_boxes))
        total = out.layer_logits[-1].new_zeros((), dtype=torch.float32)
        log: dict[str, float] = {}
        for name, lg, bx in sets:
            parts = self.set_losses(lg, bx, targets, num_boxes)
            weighted = self.weighted(parts)
            total = total + weighted
            if name == "final":
                log.update({k: float(v.detach()) for k, v in parts.items()})
            else:
                key = "loss_enc" if name == "enc" else "loss_aux"
                log[key] = log.get(key, 0.0) + float(weighted.detach())
        if out.dn is not None and out.dn_logits is not None and out.dn_boxes is not None:
            for lg, bx in zip(out.dn_logits, out.dn_boxes, strict=True):
                weighted = self.weighted(self.dn_losses(lg, bx, targets, out.dn, num_boxes))
                total = total + weighted
                log["loss_dn"] = log.get("loss_dn", 0.0) + float(weighted.detach())
        log["loss"] = float(total.detach())
        return total, log

    def dn_losses(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], dn: DenoisingQueries, num_boxes: float
    ) -> dict[str, Tensor]:
        """Losses of one layer's denoising slots: every positive slot reconstructs its GT (no matching);
        negatives and padding are background; normalised by ``num_boxes · groups`` (official DINO)."""
        onehot = torch.zeros_like(logits)
        src_boxes, tgt_boxes = [], []
        for b, t in enumerate(targets):
            slots, gt = dn.positive_pairs(b)
            slots, gt = slots.to(logits.device), gt.to(logits.device)
            onehot[b, slots, t["labels"][gt]] = 1.0
            src_boxes.append(boxes[b, slots])
            tgt_boxes.append(t["boxes"][gt])
        norm = num_boxes * dn.groups
        loss_ce = sigmoid_focal_loss(logits.float(), onehot.float(), alpha=self.alpha, gamma=self.gamma).sum() / norm
        return {"loss_ce": loss_ce, **_box_losses(torch.cat(src_boxes).float(), torch.cat(tgt_boxes).float(), norm)}


def _box_losses(src: Tensor, tgt: Tensor, norm: float) -> dict[str, Tensor]:
    """L1 and ``1 − GIoU`` of paired cxcywh boxes, summed and divided by ``norm``."""
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    return {"loss_bbox": F.l1_loss(src, tgt, reduction="sum") / norm, "loss_giou": (1 - giou).sum() / norm}


__all__ = ["SetCriterion", "sigmoid_focal_loss"]
