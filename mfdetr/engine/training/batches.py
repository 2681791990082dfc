"""Stage-2 batches for the training loop: a map-style dataset read in the seeded, resumable order of an
:class:`~mfdetr.engine.sampling.EpochPlan` through one DataLoader (workers start once per run)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from mfdetr.engine.loading import RunBatches, loader_options
from mfdetr.engine.sampling import EpochPlan


@runtime_checkable
class PerEpoch(Protocol):
    """A dataset with per-epoch draws (large-scale jitter, flip views): told the epoch before it is read."""

    def set_epoch(self, epoch: int) -> None: ...


class LoaderData:
    """:class:`~mfdetr.engine.training.loop.TrainData` of a dataset.

    Args:
        dataset: map-style; ``len`` = number of training images.
        plan: the data order (this process's share of each global batch).
        collate: batches items; the result has ``to(device)`` and ``len``.
        prepare: makes a device batch from a collated one (default ``batch.to(device)``); the online mode
            runs the frozen detector here.
        pin_memory, num_workers, prefetch_factor: DataLoader settings.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        plan: EpochPlan,
        *,
        collate: Callable[[list[Any]], Any],
        prepare: Callable[[Any, torch.device], Any] | None = None,
        pin_memory: bool = False,
        num_workers: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        self.dataset, self.plan, self.collate, self.prepare = dataset, plan, collate, prepare
        self.options = {"pin_memory": bool(pin_memory), **loader_options(num_workers, prefetch_factor)}

    def batches(self, start: int, stop: int) -> Iterator[Any]:
        step = start
        while step < stop:
            epoch, pos = self.plan.locate(step)
            sampler: Any = RunBatches(self.plan, step, stop)  # one loader for the run: workers start once
            if isinstance(self.dataset, PerEpoch):  # one loader per epoch, told its epoch first
                self.dataset.set_epoch(epoch)
                sampler = self.plan.rank_batches(epoch, pos)[: stop - step]
            for batch in DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate, **self.options):
                yield batch
                step += 1

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return self.prepare(batch, device) if self.prepare is not None else batch.to(device)


__all__ = ["LoaderData", "PerEpoch"]
