"""DataLoader settings shared by training and evaluation, so that loading is never the bottleneck.

- Workers start through an explicit ``forkserver`` (else ``spawn``) context, never ``fork``: a forked
  worker inherits the parent's zarr v3 store and its asyncio event-loop thread, which can deadlock.
  The dataset is pickled to each worker instead, and :class:`~mfdetr.cache.CacheStore` reopens the
  store there (its ``__setstate__``), so every worker has its own store handle.
- ``persistent_workers`` and ``prefetch_factor`` batches per worker; each worker runs torch with one
  thread (the reader decodes chunks on zarr's event loop), so N workers do not oversubscribe the CPU.
- :class:`RunBatches`: one batch sampler over every remaining step of a run, epoch after epoch (the
  order of :class:`~mfdetr.engine.sampling.EpochPlan`), so the workers start once per run, not per epoch.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch

from mfdetr.engine.sampling import EpochPlan


def worker_context() -> str:
    """``"forkserver"`` where the platform has it, else ``"spawn"``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def loader_options(num_workers: int, prefetch_factor: int = 2) -> dict[str, Any]:
    """Keyword arguments of ``DataLoader`` for ``num_workers`` worker processes (0 = in the main process)."""
    if num_workers <= 0:
        return {"num_workers": 0}
    return {
        "num_workers": int(num_workers),
        "multiprocessing_context": worker_context(),
        "persistent_workers": True,
        "prefetch_factor": int(prefetch_factor),
        "worker_init_fn": _worker_init,
    }


class RunBatches:
    """This rank's batches of global steps ``start .. total - 1``, in the plan's per-epoch order."""

    def __init__(self, plan: EpochPlan, start: int, total: int) -> None:
        self.plan, self.start, self.total = plan, int(start), int(total)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while step < self.total:
            epoch, pos = self.plan.locate(step)
            for batch in self.plan.rank_batches(epoch, pos)[: self.total - step]:
                yield batch
                step += 1


__all__ = ["RunBatches", "loader_options", "worker_context"]
