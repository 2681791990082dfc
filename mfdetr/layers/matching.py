"""Costs of DETR-style one-to-one (Hungarian) matching shared by the detectors' training and the
mask network's target assignment."""

from __future__ import annotations

from torch import Tensor


def focal_class_cost(prob: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable DETR / DINO focal classification cost ``pos_focal(p) − neg_focal(p)``.

    ``pos_focal = α (1−p)^γ (−log(p + 1e-8))``, ``neg_focal = (1−α) p^γ (−log(1−p + 1e-8))``, elementwise
    on ``prob`` (sigmoid probabilities of each target's class, e.g. [Q, N]).
    """
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg
