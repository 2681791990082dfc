"""Process-group setup for ``torchrun``: gloo on CPU, NCCL on CUDA; rank-0-only side effects.

``torchrun --nproc-per-node N mfdetr train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` reads them. Without them the run is a single process (world size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from mfdetr.devices import resolve_device
from mfdetr.errors import MfdetrError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank / world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistContext:
    """Initialise the default process group when launched by torchrun (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of scalar dicts over ranks (same keys on every rank); identity when not distributed."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor(
        [values[k] for k in keys], dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu"
    )
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def agree(ctx: DistContext, error: BaseException | None) -> None:
    """Stop every process together: when any process failed at this point (``error`` not ``None``),
    each one raises — the failed one its own error, the others a :class:`MfdetrError` with the first
    failed process's message — instead of waiting forever in the next collective call. A barrier too.

    Called by every process at the same points of the loop (one small all-reduce); without
    ``torchrun`` it only re-raises ``error``."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor(
        [0 if error is None else 1], dtype=torch.int32, device=ctx.device if ctx.backend == "nccl" else "cpu"
    )
    dist.all_reduce(flag)
    if int(flag.item()) == 0:
        return
    said = (
        None
        if error is None
        else (str(error) if isinstance(error, MfdetrError) else f"{type(error).__name__}: {error}")
    )
    messages: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(messages, said)
    if error is not None:
        raise error
    rank, first = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise MfdetrError(f"{' '.join(str(first).split())} (stopped by process {rank})")


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
