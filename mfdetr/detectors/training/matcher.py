"""Hungarian matching of predictions to ground truth (DETR set prediction, Carion et al. 2020).

Cost (Deformable DETR / DINO ``HungarianMatcher`` with focal classification cost)::

    C = w_class · (pos_focal(p_c) − neg_focal(p_c)) + w_bbox · ‖b − b̂‖₁ + w_giou · (−GIoU(b, b̂))

with ``p_c = sigmoid(logit of the target class)``, ``pos_focal = α (1−p)^γ (−log p)``,
``neg_focal = (1−α) p^γ (−log(1−p))``; DINO's weights are ``w_class = 2``, ``w_bbox = 5``,
``w_giou = 2``, ``α = 0.25``, ``γ = 2``. The optimal one-to-one assignment per image comes from
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mfdetr.layers import focal_class_cost
from mfdetr.ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher:
    """One-to-one matching per image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three cost terms.
        alpha, gamma: focal parameters of the classification cost.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost [Q, N] of one image: logits [Q, C], boxes [Q, 4] cxcywh, labels [N], tgt_boxes [N, 4]."""
        prob = logits.float().sigmoid()[:, labels]  # [Q, N]
        c_class = focal_class_cost(prob, alpha=self.alpha, gamma=self.gamma)
        c_bbox = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes.float()))
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        Args:
            logits: [B, Q, C]; boxes: [B, Q, 4] normalised cxcywh.
            targets: per image ``{"labels": [N] int64 head slots, "boxes": [N, 4] normalised cxcywh}``.

        Returns:
            per image ``(query_idx [M], target_idx [M])`` int64 (CPU), ``M = min(Q, N)``.
        """
        out = []
        for b, t in enumerate(targets):
            if t["labels"].numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"]).cpu()
            qi, ti = linear_sum_assignment(cost.numpy())
            out.append((torch.as_tensor(qi, dtype=torch.int64), torch.as_tensor(ti, dtype=torch.int64)))
        return out


__all__ = ["HungarianMatcher"]
