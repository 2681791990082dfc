"""The paper's step learning-rate schedule as a pure function of the global step.

Sec. 3.1: "divide the learning rate by 10 at 0.9 and 0.95 fractions of the total number of the
training iterations". The lr at step ``s`` depends only on ``s`` (no hidden scheduler state), which
makes resuming exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepDecay:
    """``lr(step) = base_lr · factor^(number of milestones ≤ step)``.

    Args:
        base_lr: learning rate before the first drop.
        total_steps: total optimiser steps of the run.
        drop_at: fractions of ``total_steps`` where the lr drops (milestone = round(fraction · total)).
        factor: multiplier applied at each milestone (0.1 = "divide by 10").
    """

    def __init__(
        self, *, base_lr: float, total_steps: int, drop_at: Sequence[float] = (0.9, 0.95), factor: float = 0.1
    ) -> None:
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.factor = float(factor)
        self.milestones = sorted(int(round(f * total_steps)) for f in drop_at)

    def lr_at(self, step: int) -> float:
        """Learning rate used for the optimiser step with 0-based index ``step``."""
        n = sum(1 for m in self.milestones if step >= m)
        return self.base_lr * self.factor**n

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's lr for ``step``; return it."""
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, object]:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "factor": self.factor,
            "milestones": list(self.milestones),
        }
