"""Training on the positives only: assign targets first, then run the box branch on those queries.

The criterion puts a loss only on the queries that receive a GT (:func:`~mfdetr.masknet.targets.assign`),
and that assignment reads only the detector's boxes/logits and the GT, never the mask network's
outputs. So a training step can assign first and run the expensive per-query part of MaskNet (box
feature encoder, query encoder, mask head, mask scoring) on the positives only
(:meth:`MaskNet.forward(det, select=...) <mfdetr.masknet.model.MaskNet.forward>`). With
object-to-object attention off this is exact: every loss and every parameter gradient equals the
all-K computation (queries do not interact; the point sampling draws the same numbers in the same
order because it sees the same positives in the same order).

:class:`PositivesOnly` packs assignment + forward into one ``forward(det, targets, step=...)`` so that
a DistributedDataParallel wrapper sees every parameter used inside its forward. Called without targets
(evaluation, inference) it is the plain all-K MaskNet.

:func:`cap_positives` caps the positives per image (``assign.max_positives_per_image``), sampled
uniformly among the assigned ones as Mask R-CNN samples its RoIs; the draw is a function of
(run seed, step, image id) only, so a resumed run and any data-parallel split pick the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.masknet.targets import Assignment, first_queries

__all__ = ["PositivesOnly", "cap_positives", "cap_seed"]


def cap_seed(seed: int, step: int, image_id: Any) -> int:
    """The RNG seed of image ``image_id``'s positive sampling at ``step`` of a run seeded ``seed``."""
    h = hashlib.blake2b(f"positives/{seed}/{step}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def cap_positives(a: Assignment, max_per_image: int | None, seeds: Sequence[int]) -> Assignment:
    """At most ``max_per_image`` positives of each image, drawn uniformly without replacement.

    Args:
        a: the assignment of a batch of ``len(seeds)`` images (positives grouped by image).
        max_per_image: the cap; 0 or ``None`` returns ``a`` unchanged.
        seeds: one RNG seed per image (:func:`cap_seed`).

    Returns:
        The kept positives in their original order (an image with ≤ cap positives keeps all).
    """
    if not max_per_image or len(a) == 0:
        return a
    bi = a.batch_idx.cpu()
    keep = []
    for b, seed in enumerate(seeds):
        sel = torch.nonzero(bi == b).flatten()
        if sel.numel() > max_per_image:
            g = torch.Generator().manual_seed(int(seed))
            sel = sel[torch.randperm(int(sel.numel()), generator=g)[:max_per_image].sort().values]
        keep.append(sel)
    idx = torch.cat(keep).sort().values.to(a.batch_idx.device)
    return Assignment(batch_idx=a.batch_idx[idx], query_idx=a.query_idx[idx], gt_idx=a.gt_idx[idx], ignored=a.ignored)


class PositivesOnly(nn.Module):
    """The training module of stage 2: target assignment, then MaskNet on the positives only.

    Args:
        masknet: the mask network (its state dict is this module's: checkpoints hold plain MaskNet keys).
        criterion: the :class:`~mfdetr.masknet.criterion.MaskCriterion` whose
            :meth:`~mfdetr.masknet.criterion.MaskCriterion.assign_targets` picks the positives.

    ``forward(det, targets, step=s)`` returns the MaskNet output of the positives (``selected``) with
    the assignment attached (``assignment``), which the criterion then scores without assigning again;
    ``forward(det)`` is ``masknet(det)`` (all K queries). With object-to-object attention (and in the
    non-RoI baseline) MaskNet itself computes all K queries and returns the positives' rows.
    """

    def __init__(self, masknet: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.masknet = masknet
        self.criterion = criterion

    @property
    def num_queries(self) -> int:
        return int(self.masknet.num_queries)  # type: ignore[arg-type]

    def forward(self, det: DetectorOutput, targets: Sequence[GTInstances] | None = None, *, step: int = 0) -> Any:
        if targets is None:
            return self.masknet(det)
        k = min(self.num_queries, det.num_queries)
        a = self.criterion.assign_targets(first_queries(det, k), targets, step=step)  # type: ignore[operator]
        out = self.masknet(det, select=(a.batch_idx, a.query_idx))
        return dataclasses.replace(out, assignment=a)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.masknet.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.masknet.load_state_dict(state_dict, strict=strict, assign=assign)
