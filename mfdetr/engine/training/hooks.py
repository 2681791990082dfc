"""The hooks of :class:`~mfdetr.engine.training.loop.Trainer`: lr schedule, per-step seeding, metrics log,
progress bar, checkpoints (and resume), evaluation.

Hooks share state through the trainer only: :class:`LRSchedule` sets ``trainer.lr``; :class:`MetricsLog`
sets ``trainer.logged`` (the window means it just logged, else ``None``) for :class:`Progress`. Their
order in the trainer's list is the order they run in: schedule and seeding before the step; after it
the log, the bar, the checkpoint, the evaluation (a checkpoint then holds the emptied log window).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mfdetr.engine.checkpoint import atomic_torch_save, capture_rng, restore_rng, seed_step
from mfdetr.engine.distributed import DistContext, agree, all_reduce_mean
from mfdetr.engine.training.loop import HookBase
from mfdetr.errors import MfdetrError

if TYPE_CHECKING:
    from mfdetr.engine.metrics import MetricLogger
    from mfdetr.engine.training.loop import Trainer


class Schedule(Protocol):
    """An lr schedule: a pure function of the global step, applied to every group times its ``lr_scale``."""

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float: ...

    def state_dict(self) -> dict[str, object]: ...


class LRSchedule(HookBase):
    """Sets the lr of every step before it runs (``trainer.lr``); recorded as ``schedule``."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def before_step(self, trainer: Trainer) -> None:
        trainer.lr = self.schedule.apply(trainer.optimizer, trainer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}


class StepSeed(HookBase):
    """Reseeds torch/numpy/python from ``(seed, step, rank)`` before each step: dropout and sampling in a
    loss do not depend on what ran before (exact resume, with or without DataLoader workers)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def before_step(self, trainer: Trainer) -> None:
        seed_step(self.seed, trainer.step, trainer.ctx.rank)


class MetricsLog(HookBase):
    """Means of every step's losses (and grad norm) over a window of ``every`` steps, averaged over the
    processes and written as ``train`` records with ``lr`` and ``img_s`` (and ``epoch``); the partial
    window is checkpointed (``log_window``) so that a resumed run logs the same means.

    Args:
        open_log: opens the run's :class:`~mfdetr.engine.metrics.MetricLogger` given the step the run starts
            at (``None`` on the processes that do not log).
        every: log every this many steps, and at the last step.
        epoch_of: the epoch of a global step (recorded with each record).
        echo: also called with each record (a console line).
    """

    def __init__(
        self,
        open_log: Callable[[int], MetricLogger] | None,
        *,
        every: int,
        epoch_of: Callable[[int], int],
        echo: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.open_log, self.every, self.epoch_of, self.echo = open_log, max(1, int(every)), epoch_of, echo
        self.logger: MetricLogger | None = None
        self.window: dict[str, list[float]] = {}
        self._t, self._n = time.perf_counter(), 0

    def before_train(self, trainer: Trainer) -> None:
        if self.open_log is not None:
            self.logger = self.open_log(trainer.step)
        self._t, self._n = time.perf_counter(), 0

    def log(self, kind: str, step: int, scalars: Mapping[str, float], **extra: Any) -> None:
        """Write one record (on the process that logs)."""
        if self.logger is not None:
            self.logger.log(kind, step, scalars, **extra)

    def after_step(self, trainer: Trainer) -> None:
        rec = trainer.last
        self._n += rec.images
        vals = dict(rec.losses) if rec.grad_norm is None else {**rec.losses, "grad_norm": rec.grad_norm}
        for k, v in vals.items():
            self.window.setdefault(k, []).append(v)
        trainer.logged = None
        if trainer.step % self.every and trainer.step != trainer.stop:
            return
        means = all_reduce_mean({k: sum(v) / len(v) for k, v in self.window.items()}, trainer.ctx)
        dt = time.perf_counter() - self._t
        row = {**means, "lr": trainer.lr, "img_s": self._n / dt if dt > 0 else math.nan}
        self.log("train", trainer.step, row, epoch=self.epoch_of(trainer.step - 1))
        if self.echo is not None:
            self.echo(trainer.step, row)
        trainer.logged = row
        self.window, self._t, self._n = {}, time.perf_counter(), 0

    def state_dict(self) -> dict[str, Any]:
        return {"log_window": self.window}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.window = {k: list(v) for k, v in state.get("log_window", {}).items()}

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


class Progress(HookBase):
    """A tqdm bar over the run's steps (rank 0), with the last logged loss, img/s and lr."""

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.bar: Any = None

    def before_train(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total,
            initial=trainer.step,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )

    def after_step(self, trainer: Trainer) -> None:
        m = trainer.logged
        if m is not None:
            pos = {"pos_img": f"{m['pos_per_image']:.1f}"} if "pos_per_image" in m else {}
            self.bar.set_postfix(
                loss=f"{m.get('loss', math.nan):.4f}", img_s=f"{m['img_s']:.1f}", lr=f"{m['lr']:.2e}", **pos
            )
        self.bar.update(1)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(HookBase):
    """Writes the training state (:meth:`Trainer.state_dict` + ``rng`` of every process + ``extra(step)``)
    atomically to ``path`` every ``every`` steps, at the end, and on Ctrl-C (one process); with ``keep``
    also to ``<path stem>_<step>.pt``. Weights that are not finite are never written."""

    def __init__(
        self,
        path: str | Path,
        *,
        every: int = 0,
        keep: bool = False,
        extra: Callable[[int], Mapping[str, Any]] = lambda step: {},
    ) -> None:
        self.path, self.every, self.keep, self.extra = Path(path), int(every), bool(keep), extra

    def after_step(self, trainer: Trainer) -> None:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.stop:
            self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer)

    def on_interrupt(self, trainer: Trainer) -> None:
        if not trainer.ctx.distributed:  # ranks may stop at different points: the last periodic one resumes
            self.save(trainer)

    def kept(self) -> str:
        """What a stopped run leaves (for error messages)."""
        return f"the last good checkpoint {self.path} is kept" if self.path.is_file() else "no checkpoint was written"

    def save(self, trainer: Trainer) -> None:
        ctx, step = trainer.ctx, trainer.step
        bad = [n for n, p in trainer.model.network.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise MfdetrError(
                f"non-finite weights after step {step} ({', '.join(bad[:4])}): not saved, "
                f"{'the last good checkpoint is kept' if self.path.is_file() else 'no checkpoint'}",
                path=self.path,
            )
        rngs = gather_rng(ctx)
        if ctx.is_main:
            state = {**trainer.state_dict(), "rng": dict(enumerate(rngs)), **self.extra(step)}
            try:
                atomic_torch_save(state, self.path)
                if self.keep:
                    atomic_torch_save(state, self.path.with_name(f"{self.path.stem}_{step:07d}{self.path.suffix}"))
            except Exception as e:  # noqa: BLE001 - every process stops with it
                agree(ctx, e)
        agree(ctx, None)


def gather_rng(ctx: DistContext) -> list[Any]:
    """Every process's RNG states, in rank order (collective when distributed)."""
    rngs = [capture_rng()]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, rngs[0])
        rngs = gathered
    return rngs


def restore(trainer: Trainer, ckpt: Mapping[str, Any], *, path: str | Path) -> None:
    """Resume ``trainer`` from a checkpoint whose ``model`` is already loaded: optimizer, scaler, step,
    every hook's state and this process's RNG (missing in older files: left as they are)."""
    try:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") is not None:
            trainer.scaler.load_state_dict(ckpt["scaler"])
        trainer.step = int(ckpt["step"])
        for h in trainer.hooks:
            h.load_state_dict(ckpt)
        rng = (ckpt.get("rng") or {}).get(trainer.ctx.rank)
        if rng is not None:
            restore_rng(rng)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise MfdetrError(
            f"damaged checkpoint: cannot restore the training state ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]})",
            path=path,
        ) from None


class Evaluation(HookBase):
    """Calls ``fn(network, step)`` on rank 0 (``eval()`` mode, no gradients) after each step where
    ``when(step)`` holds, and after the last step (``at_end``; else only if ``when`` holds there); every process stops if it fails. ``report(step, metrics)``
    records the result; the last one is kept in ``metrics``."""

    def __init__(
        self,
        fn: Callable[[torch.nn.Module, int], Mapping[str, Any]],
        *,
        when: Callable[[int], bool],
        at_end: bool = True,
        report: Callable[[int, dict[str, Any]], None] = lambda s, m: None,
    ) -> None:
        self.fn, self.when, self.at_end, self.report = fn, when, at_end, report
        self.metrics: dict[str, Any] = {}

    def after_step(self, trainer: Trainer) -> None:
        if self.when(trainer.step) and (trainer.step < trainer.stop or not self.at_end):
            self.run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.at_end:
            self.run(trainer)

    def run(self, trainer: Trainer) -> None:
        failed = None
        net = trainer.model.network
        if trainer.ctx.is_main:
            net.eval()
            try:
                with torch.no_grad():
                    self.metrics = dict(self.fn(net, trainer.step))
            except Exception as e:  # noqa: BLE001 - every process stops with it
                failed = e
            net.train()
        agree(trainer.ctx, failed)
        if trainer.ctx.is_main:
            self.report(trainer.step, self.metrics)


__all__ = [
    "Checkpointer",
    "Evaluation",
    "LRSchedule",
    "MetricsLog",
    "Progress",
    "Schedule",
    "StepSeed",
    "gather_rng",
    "restore",
]
