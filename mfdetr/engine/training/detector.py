"""Training a DINO preset from scratch (the ``demo`` detector) on the engine's loop.

What is specific to DETR training — matcher, set criterion, denoising, the training forward, the
data, the recipe — lives in :mod:`mfdetr.detectors.training`; this module composes it with the loop
(:class:`~mfdetr.engine.training.loop.Trainer`) and its hooks: the checkpoint, resume and metrics log
are the ones stage 2 uses. One run = one output folder::

    OUT/config.json       the resolved config
    OUT/checkpoint.pt     latest training state (model, optimizer, step, rng, ...) — written atomically
    OUT/log.jsonl         one JSON record per logged step / evaluation (``tb/``: the same in TensorBoard)
    OUT/weights.pt        the final (or exported) detector weights ``{"model": state_dict}``

Determinism: the model init comes from ``torch.manual_seed(seed)``, the batches of epoch ``e`` from
:func:`~mfdetr.detectors.training.data.epoch_batches` (seeded shuffle, one input size per batch), the
flips from ``[seed, epoch, index]`` and the denoising noise of step ``s`` from ``(seed, s)``, so a run
resumed from any checkpoint sees the same batches as an uninterrupted one. Checkpoints of the earlier
format (``model``, ``optimizer``, ``step``, ``config``) still resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.config import to_dict
from mfdetr.detectors.dino.model import DinoDetector
from mfdetr.detectors.training.criterion import SetCriterion
from mfdetr.detectors.training.data import DetectionTrainSet, TrainBatch, epoch_batches, min_batches
from mfdetr.detectors.training.denoising import prepare_cdn
from mfdetr.detectors.training.evaluate import box_ap
from mfdetr.detectors.training.forward import dino_train_forward
from mfdetr.detectors.training.matcher import HungarianMatcher
from mfdetr.detectors.training.recipe import DetTrainConfig, LossOptions, build_trainable, param_groups, save_weights
from mfdetr.engine.distributed import DistContext
from mfdetr.engine.metrics import MetricLogger
from mfdetr.engine.training.hooks import Checkpointer, Evaluation, LRSchedule, MetricsLog, restore
from mfdetr.engine.training.loop import ParamGroup, Trainer
from mfdetr.errors import Interrupted, MfdetrError


class DinoTraining:
    """:class:`~mfdetr.engine.training.loop.TrainModel` of a DINO trained from scratch: the set criterion
    over every decoder layer and the encoder proposals, with contrastive denoising when configured."""

    unused_parameters = False

    def __init__(
        self,
        network: DinoDetector,
        criterion: SetCriterion,
        *,
        loss: LossOptions,
        seed: int,
        groups: list[dict[str, Any]],
    ) -> None:
        self.network, self.criterion, self.loss, self.seed, self.groups = network, criterion, loss, int(seed), groups

    def to(self, device: torch.device) -> None:
        self.network.to(device)

    def param_groups(self) -> list[ParamGroup]:
        """The recipe's groups, their ``lr_mult`` as the schedule's ``lr_scale``."""
        return [{"params": g["params"], "lr_scale": g["lr_mult"], "lr_mult": g["lr_mult"]} for g in self.groups]

    def losses(self, net: nn.Module, batch: TrainBatch, step: int) -> Mapping[str, Tensor]:
        model, lo = self.network, self.loss
        dn = None
        if lo.dn_number > 0:  # the noise of step s is a function of (seed, s): exact resume
            dn = prepare_cdn(
                batch.targets,
                label_enc=model.label_enc,
                num_classes=model.preset.num_classes,
                num_queries=model.transformer.num_queries,
                dn_number=lo.dn_number,
                label_noise_ratio=lo.dn_label_noise_ratio,
                box_noise_scale=lo.dn_box_noise_scale,
                generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step),
            )
        loss, parts = self.criterion(dino_train_forward(net, batch.images, batch.pad_mask, dn), batch.targets)
        return {"loss": loss, **{k: torch.tensor(v) for k, v in parts.items() if k != "loss"}}

    def image_ids(self, batch: TrainBatch) -> list[Any]:
        return list(batch.image_ids)


class _Batch(TrainBatch):
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> _Batch:
        return self


class DetectionBatches:
    """:class:`~mfdetr.engine.training.loop.TrainData` of a detection split: epoch ``e``'s first
    ``steps_per_epoch`` seeded batches of one input size, flipped per image."""

    def __init__(
        self, dataset: DetectionTrainSet, *, batch_size: int, steps_per_epoch: int, seed: int, hflip: float
    ) -> None:
        self.dataset, self.batch_size, self.steps_per_epoch = dataset, int(batch_size), int(steps_per_epoch)
        self.seed, self.hflip = int(seed), float(hflip)

    def batches(self, start: int, stop: int) -> Iterator[TrainBatch]:
        step = start
        while step < stop:
            epoch, pos = divmod(step, self.steps_per_epoch)
            order = epoch_batches(self.dataset.groups, self.batch_size, seed=self.seed, epoch=epoch)
            for idx in order[pos : self.steps_per_epoch][: stop - step]:
                b = self.dataset.batch(idx, epoch=epoch, seed=self.seed, hflip=self.hflip)
                yield _Batch(images=b.images, pad_mask=b.pad_mask, targets=b.targets, image_ids=b.image_ids)
                step += 1

    def to_device(self, batch: TrainBatch, device: torch.device) -> TrainBatch:
        return batch


class EpochDrop:
    """``lr(step) = lr · factor`` from epoch ``drop_epoch`` on, else ``lr``."""

    def __init__(self, *, lr: float, steps_per_epoch: int, drop_epoch: int, factor: float) -> None:
        self.lr, self.steps_per_epoch, self.drop_epoch, self.factor = lr, steps_per_epoch, drop_epoch, factor

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr * (self.factor if step // self.steps_per_epoch >= self.drop_epoch else 1.0)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, object]:
        return {
            "lr": self.lr,
            "steps_per_epoch": self.steps_per_epoch,
            "drop_epoch": self.drop_epoch,
            "factor": self.factor,
        }


def _read_state(path: Path) -> dict[str, Any]:
    """A training checkpoint; one of the earlier format gets its optimiser groups' ``lr_scale``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for g in state.get("optimizer", {}).get("param_groups", []):
        g.setdefault("lr_scale", g.get("lr_mult", 1.0))
    return state


def _console(log: Callable[[str], None], epoch_of: Callable[[int], int]) -> Callable[[int, dict[str, float]], None]:
    def echo(step: int, row: dict[str, float]) -> None:
        row = {"step": step, "epoch": epoch_of(step - 1), **row}
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    return echo


def _evaluation(
    cfg: DetTrainConfig, out: Path, spe: int, metrics: MetricsLog, log: Callable[[str], None]
) -> Evaluation:
    """Box AP on the validation split at the end of every ``eval_every_epochs``-th epoch, and that
    epoch's weights (``weights_epoch<n>.pt``)."""
    o, d = cfg.train, cfg.data

    def evaluate(net: nn.Module, step: int) -> dict[str, float]:
        ap = box_ap(net, d.root, d.val_split, max_images=d.val_images)  # type: ignore[arg-type]
        save_weights(net, out / f"weights_epoch{step // spe}.pt")
        return ap

    def report(step: int, ap: dict[str, float]) -> None:
        metrics.log("eval", step, ap, epoch=step // spe, val=ap)
        log(f"step={step} val box " + " ".join(f"{k}={v:.2f}" for k, v in ap.items()))

    return Evaluation(
        evaluate,
        when=lambda s: (
            s % spe == 0 and o.eval_every_epochs > 0 and bool(d.val_split) and (s // spe) % o.eval_every_epochs == 0
        ),
        at_end=False,
        report=report,
    )


def train_detector(
    cfg: DetTrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or resume) a detector; returns a summary (steps, seconds, last losses, last AP).

    Args:
        cfg: the recipe; out: the run folder.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        max_steps: stop after this global step (tests, smoke runs); the schedule is unchanged.
    """
    out, o = Path(out), cfg.train
    out.mkdir(parents=True, exist_ok=True)
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    if not cfg.data.root:
        raise MfdetrError("data.root is not set: pass the COCO-format folder (e.g. data.root=DIR)")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    model = build_trainable(cfg.preset, seed=o.seed)
    train_set = DetectionTrainSet(
        cfg.data.root,
        cfg.data.train_split,
        preprocessing=model.preset.preprocessing,
        class_to_category=model.preset.class_to_category,
        max_images=cfg.data.max_train_images,
        by_size=cfg.data.batch_by_size,
    )
    spe = min_batches(train_set.groups, o.batch_size)  # every epoch has at least this many
    if spe <= 0:
        raise MfdetrError(f"{len(train_set)} training images < batch size {o.batch_size}")
    total = spe * o.epochs
    task = DinoTraining(model, _criterion(cfg.loss), loss=cfg.loss, seed=o.seed, groups=param_groups(model, o))
    ckpt_path = out / "checkpoint.pt"
    state = _read_state(ckpt_path) if resume and ckpt_path.is_file() else None
    epoch_of = lambda s: s // spe  # noqa: E731
    metrics = MetricsLog(
        lambda start: MetricLogger(out, resume_step=start if state is not None else None, name="log.jsonl"),
        every=o.log_every,
        epoch_of=epoch_of,
        echo=_console(log, epoch_of),
    )
    saver = Checkpointer(
        ckpt_path, every=o.checkpoint_every, extra=lambda s: {"epoch": epoch_of(s), "config": to_dict(cfg)}
    )
    hooks = [
        LRSchedule(EpochDrop(lr=o.lr, steps_per_epoch=spe, drop_epoch=o.lr_drop_epoch, factor=o.lr_drop_factor)),
        metrics,
        saver,
        _evaluation(cfg, out, spe, metrics, log),
    ]
    trainer = Trainer(
        model=task,
        data=DetectionBatches(
            train_set, batch_size=o.batch_size, steps_per_epoch=spe, seed=o.seed, hflip=cfg.data.hflip
        ),
        optimizer=torch.optim.AdamW(task.param_groups(), lr=o.lr, weight_decay=o.weight_decay),
        hooks=hooks,
        ctx=DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None),
        start=0,
        stop=total if max_steps is None else min(total, max_steps),
        clip_grad_norm=o.clip_grad_norm,
        interrupt=lambda t: Interrupted(step=t.step, checkpoint=ckpt_path),
    )
    if state is not None:
        model.load_state_dict(state["model"])
        restore(trainer, state, path=ckpt_path)
        log(f"resumed from {ckpt_path} at step {trainer.step}/{total}")
    t0 = time.time()
    trainer.train()
    if trainer.step >= total:
        save_weights(model, out / "weights.pt")
    return _summary(trainer, hooks[-1], epoch=epoch_of(max(trainer.step - 1, 0)), total=total, t0=t0)


def _criterion(lo: LossOptions) -> SetCriterion:
    """The detection loss of the recipe's ``[loss]`` (Hungarian matching costs, loss weights)."""
    return SetCriterion(
        matcher=HungarianMatcher(cost_class=lo.cost_class, cost_bbox=lo.cost_bbox, cost_giou=lo.cost_giou),
        weight_ce=lo.weight_ce,
        weight_bbox=lo.weight_bbox,
        weight_giou=lo.weight_giou,
        aux=lo.aux,
        enc=lo.enc,
    )


def _summary(trainer: Trainer, ev: Any, *, epoch: int, total: int, t0: float) -> dict[str, Any]:
    """What :func:`train_detector` returns: the last step's losses and validation AP, steps, seconds."""
    last: dict[str, Any] = {"step": trainer.step, "epoch": epoch, "lr": trainer.lr, **trainer.last.losses}
    if isinstance(ev, Evaluation) and ev.metrics:
        last["val"] = ev.metrics
    return {**last, "steps": trainer.step, "total_steps": total, "seconds": round(time.time() - t0, 1)}


__all__ = ["DetectionBatches", "DinoTraining", "EpochDrop", "train_detector"]
