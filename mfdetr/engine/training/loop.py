"""The training loop: one optimiser step per batch, everything else in hooks.

:class:`Trainer` runs ``before_train``, then for every batch ``before_step`` → one step → ``after_step``,
then ``after_train``; a Ctrl-C between two steps calls every hook's ``on_interrupt`` and raises what the
loop's ``interrupt`` builds (:func:`mfdetr.interrupts.interruptible`). What is trained is a
:class:`TrainModel` (the losses of a batch, the optimiser's parameter groups), fed by a
:class:`TrainData` (host batches of global steps, and how one moves to the device). Checkpoints, lr
schedule, logging, evaluation and progress are hooks (:mod:`.hooks`) that read and write the trainer's
public state: ``step``, ``stop``, ``optimizer``, ``scaler``, ``last`` (the step's losses) and ``meta``.

Every process of a torchrun job runs the same loop: :func:`~mfdetr.engine.distributed.agree` is
called before each collective step (DDP's forward and backward), so an error in one process (a
damaged input, a non-finite loss) stops them all instead of leaving the others waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mfdetr.engine.distributed import DistContext, agree
from mfdetr.errors import MfdetrError
from mfdetr.interrupts import interruptible

ParamGroup = dict[str, Any]


@runtime_checkable
class TrainModel(Protocol):
    """What the loop trains.

    ``network`` is the module whose weights are optimised and checkpointed (wrapped in DDP by the loop
    when distributed); ``unused_parameters`` tells DDP that some trainable parameters may get no gradient.
    """

    network: nn.Module
    unused_parameters: bool

    def to(self, device: torch.device) -> None:
        """Move the network (and whatever computes the losses) to ``device``."""
        ...

    def param_groups(self) -> list[ParamGroup]:
        """Optimiser groups; each carries an ``lr_scale`` relative to the scheduled lr."""
        ...

    def losses(self, net: nn.Module, batch: Any, step: int) -> Mapping[str, Tensor]:
        """The losses of one device batch, computed through ``net`` (``network`` or its DDP wrapper);
        must hold the optimised total as ``total`` or ``loss``."""
        ...

    def image_ids(self, batch: Any) -> list[Any]:
        """The image ids of a batch (named when its loss is not finite)."""
        ...


@runtime_checkable
class TrainData(Protocol):
    """Where the batches come from: ``batches(start, stop)`` yields this process's host batches of the
    global steps ``start .. stop - 1`` in order; ``to_device`` makes one ready for ``losses``."""

    def batches(self, start: int, stop: int) -> Iterable[Any]: ...

    def to_device(self, batch: Any, device: torch.device) -> Any: ...


class HookBase:
    """A hook of :class:`Trainer`: every method is optional. ``state_dict`` entries go into the
    checkpoint at the top level and come back through ``load_state_dict`` on resume."""

    def before_train(self, trainer: Trainer) -> None: ...

    def before_step(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...

    def on_interrupt(self, trainer: Trainer) -> None: ...

    def close(self) -> None:
        """Release files and bars (also after an error); called once the loop is left, however."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class AmpSettings:
    """Autocast of the forward pass (``enabled`` only on CUDA) and whether a GradScaler is needed."""

    enabled: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def scales(self) -> bool:
        return self.enabled and self.dtype == torch.float16


@dataclass
class StepRecord:
    """What one step leaves for the hooks: scalar losses (``total`` logged as ``loss``), grad norm, images."""

    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    images: int = 0


def loss_total(losses: Mapping[str, Tensor]) -> Tensor:
    for key in ("total", "loss"):
        if key in losses:
            return losses[key]
    raise KeyError(f"criterion returned no 'total' or 'loss' entry (keys: {sorted(losses)})")


def _guarded(items: Iterable[Any]) -> Iterator[tuple[Any, BaseException | None]]:
    """``(item, None)`` for each item, then ``(None, error)`` if fetching one fails (see :func:`agree`)."""
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises it
            yield None, e
            return
        yield item, None


class Trainer:
    """Trains ``model`` on ``data`` from global step ``start`` to ``stop`` (see the module doc).

    Args:
        model: the :class:`TrainModel`; its network already on ``ctx.device``.
        data: the :class:`TrainData`.
        optimizer: built over ``model.param_groups()``.
        hooks: called in this order at every point.
        ctx: this process in the job (device, rank, world size).
        start, stop: the global steps to run (``stop`` may end before the schedule does).
        amp: autocast settings; clip_grad_norm: clip the total gradient norm (0 = off).
        find_unused_parameters: tell DDP that parameters may get no gradient (also when the model says so).
        interrupt: builds the exception raised on Ctrl-C (after the hooks' ``on_interrupt``).
        nonfinite: builds the error for a non-finite loss from ``(losses, image ids)``.
    """

    def __init__(
        self,
        *,
        model: TrainModel,
        data: TrainData,
        optimizer: torch.optim.Optimizer,
        hooks: Sequence[HookBase],
        ctx: DistContext,
        start: int,
        stop: int,
        amp: AmpSettings | None = None,
        clip_grad_norm: float = 0.0,
        find_unused_parameters: bool = False,
        interrupt: Callable[[Trainer], BaseException] | None = None,
        nonfinite: Callable[[Trainer, Mapping[str, Tensor], list[Any]], Exception] | None = None,
    ) -> None:
        self.model, self.data, self.optimizer, self.hooks, self.ctx = model, data, optimizer, list(hooks), ctx
        self.step, self.stop = int(start), int(stop)
        self.amp = amp or AmpSettings()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp.scales)
        self.clip_grad_norm = float(clip_grad_norm)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.net: nn.Module = model.network
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model.network, device_ids=None, find_unused_parameters=find_unused_parameters or model.unused_parameters
            )
        self._interrupt = interrupt or (lambda t: KeyboardInterrupt())
        self._nonfinite = nonfinite or _nonfinite_error
        self.last = StepRecord()
        self.lr = math.nan  # set by the lr schedule hook
        self.logged: dict[str, float] | None = None  # set by the metrics hook at a logging step

    def train(self) -> None:
        """Run every step from ``step`` to ``stop`` (see the class doc)."""
        try:
            self._each(lambda h: h.before_train(self))
            self.model.network.train()
            for batch, failed in interruptible(_guarded(self.data.batches(self.step, self.stop)), self._interrupted):
                self._each(lambda h: h.before_step(self))
                self.run_step(batch, failed)
                self.step += 1
                self._each(lambda h: h.after_step(self))
            self._each(lambda h: h.after_train(self))
        finally:
            for h in self.hooks:
                h.close()

    def run_step(self, batch: Any, failed: BaseException | None) -> None:
        """One optimiser step on ``batch`` (every process agrees first that it has one)."""
        try:
            if failed is None:
                batch = self.data.to_device(batch, self.ctx.device)
        except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises it
            failed = e
        agree(self.ctx, failed)
        try:
            with torch.autocast(self.ctx.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
                losses = self.model.losses(self.net, batch, self.step)
            loss = loss_total(losses)
            if not bool(torch.isfinite(loss)):
                raise self._nonfinite(self, losses, self.model.image_ids(batch))
        except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises it
            failed = e
        agree(self.ctx, failed)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        vals = {("loss" if k in ("total", "loss") else k): float(v.detach()) for k, v in losses.items()}
        self.last = StepRecord(losses=vals, grad_norm=grad_norm, images=len(batch) * self.ctx.world_size)

    def state_dict(self) -> dict[str, Any]:
        """The loop's state and every hook's (``model``, ``optimizer``, ``scaler``, ``step``, ...)."""
        state: dict[str, Any] = {
            "model": self.model.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
        }
        for h in self.hooks:
            state.update(h.state_dict())
        return state

    def _each(self, call: Callable[[HookBase], None]) -> None:
        for h in self.hooks:
            call(h)

    def _interrupted(self) -> BaseException:
        self._each(lambda h: h.on_interrupt(self))
        return self._interrupt(self)


def _nonfinite_error(trainer: Trainer, losses: Mapping[str, Tensor], image_ids: list[Any]) -> Exception:
    parts = ", ".join(f"{k} {float(v.detach()):g}" for k, v in losses.items())
    return MfdetrError(
        f"non-finite loss at step {trainer.step + 1} on image ids {image_ids} ({parts}); training stopped"
    )


__all__ = ["AmpSettings", "HookBase", "ParamGroup", "StepRecord", "TrainData", "TrainModel", "Trainer", "loss_total"]
