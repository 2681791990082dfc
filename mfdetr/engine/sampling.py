"""Data order as a pure function of (seed, epoch, step): exact resume and disjoint per-rank splits.

Every epoch draws one permutation of the training items from a generator seeded by
``(seed, epoch)``. It is wrapped around to a multiple of the global batch (``batch_size × world``),
so every rank runs the same number of steps; global step ``s`` of the epoch takes the slice
``[s·B·W, (s+1)·B·W)`` and rank ``r`` its ``r``-th block of ``B`` items. Ranks therefore never share an
item within a step (only the wrapped tail of an epoch repeats a few items, as ``DistributedSampler``
does). A resumed run needs nothing but the global step to continue the same order.
"""

from __future__ import annotations

import hashlib
import math

import torch


def _perm_seed(seed: int, epoch: int) -> int:
    h = hashlib.blake2b(f"perm/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class EpochPlan:
    """Per-rank batches of indices for every epoch.

    Args:
        num_items: training items (images).
        batch_size: items per rank and step.
        world_size / rank: the distributed layout (1 / 0 when not distributed).
        seed: run seed.
        shuffle: draw a fresh permutation per epoch (else the identity order).
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise ValueError("no training items")
        self.num_items, self.batch_size = num_items, batch_size
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = math.ceil(num_items / self.global_batch)

    def order(self, epoch: int) -> list[int]:
        """The epoch's global order, wrapped to ``steps_per_epoch × global_batch`` items."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_perm_seed(self.seed, epoch))
            perm = torch.randperm(self.num_items, generator=g).tolist()
        else:
            perm = list(range(self.num_items))
        total = self.steps_per_epoch * self.global_batch
        reps = math.ceil(total / self.num_items)
        return (perm * reps)[:total]

    def rank_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch`` from in-epoch step ``start`` on."""
        order = self.order(epoch)
        b, gb, r = self.batch_size, self.global_batch, self.rank
        return [order[s * gb + r * b : s * gb + (r + 1) * b] for s in range(start, self.steps_per_epoch)]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, in-epoch step) of global step ``step``."""
        return divmod(step, self.steps_per_epoch)
