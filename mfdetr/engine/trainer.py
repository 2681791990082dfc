"""Stage-2 training on the loop of :mod:`mfdetr.engine.training`: AdamW + step decay, AMP, clipping, DDP,
logging, exact resume, the run folder.

Everything trained is injected: the model (a :class:`~mfdetr.engine.training.loop.TrainModel`, or a
module ``forward(det) -> outputs`` with a criterion ``criterion(outputs, det, targets) -> {"total" |
"loss": Tensor, ...}``), the training Dataset (items ``(DetectorOutput B=1, GTInstances)``) and its
collate function, and an optional ``evaluate_fn(model, step) -> {metric: value}``. Nothing here builds
a MaskNet or opens a cache, so the same loop trains from the cache, online, or a toy model in tests.

Exact resume (CPU: identical losses after resuming). The loop keeps no hidden state that a checkpoint
would miss: the data order is a function of ``(seed, epoch)`` (:class:`EpochPlan`), the lr a function of
the step (:class:`StepDecay`), and every step reseeds torch/numpy/python from ``(seed, step, rank)``
(:func:`seed_step`) before its forward pass, so dropout and point sampling in the loss do not depend
on what ran before — with or without DataLoader workers. Model, optimizer and GradScaler states, the
step and the partial logging window are checkpointed atomically.

Run folder ``<out>/``: ``config.json`` (full run config), ``run.json`` (cache manifest hash, library
versions, world size, global batch, lr, steps), ``metrics.jsonl``, ``tb/`` (TensorBoard),
``ckpt.pt`` (latest; final at the end), optionally ``ckpt_<step>.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mfdetr.engine.checkpoint import (
    atomic_write_text,
    library_versions,
    load_checkpoint,
    load_weights,
    python_command,
    seed_step,
)
from mfdetr.engine.collate import collate_detector_outputs
from mfdetr.engine.config import RunConfig, TrainConfig, diff_configs
from mfdetr.engine.distributed import DistContext, barrier, init_distributed
from mfdetr.engine.metrics import MetricLogger
from mfdetr.engine.optim import make_adamw
from mfdetr.engine.sampling import EpochPlan
from mfdetr.engine.schedule import StepDecay
from mfdetr.engine.training.batches import LoaderData
from mfdetr.engine.training.hooks import (
    Checkpointer,
    Evaluation,
    HookBase,
    LRSchedule,
    MetricsLog,
    Progress,
    StepSeed,
    restore,
)
from mfdetr.engine.training.loop import AmpSettings, TrainModel, Trainer
from mfdetr.engine.training.models import Criterion, Supervised
from mfdetr.errors import Interrupted, MfdetrError
from mfdetr.outputs import exclusive_folder

EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]

# Settings that may change between a run and its resumption without changing any result.
RESUMABLE_CHANGES = {
    "train.progress",
    "train.num_workers",
    "train.prefetch_factor",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.device",
    "masknet.checkpoint_tokens",
}


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 holds the records)."""

    run_dir: Path
    steps: int
    total_steps: int
    global_batch: int
    lr: float
    last_losses: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed every RNG before building a model (its initialisation is then a function of ``seed``)."""
    seed_step(seed, -1)


def _say(ctx: DistContext, msg: str) -> None:
    if ctx.is_main:
        print(f"mfdetr: {msg}", file=sys.stderr, flush=True)


def amp_settings(cfg_amp: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` of autocast for a ``train.amp`` setting on ``device`` (never on CPU)."""
    if device.type != "cuda" or cfg_amp == "off":
        return False, torch.float32  # fp32 on CPU
    return True, (torch.bfloat16 if cfg_amp == "bf16" else torch.float16)


def train(*, run_dir: str | Path, **kwargs: Any) -> TrainResult:
    """:func:`_train` holding ``run_dir`` (the writing process): two runs never write one folder."""
    if os.environ.get("RANK", "0") != "0":
        return _train(run_dir=run_dir, **kwargs)
    with exclusive_folder(run_dir):
        return _train(run_dir=run_dir, **kwargs)


def _resume_state(cfg_dict: dict[str, Any], run_dir: Path, resume: bool, ctx: DistContext) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues (checked against this run's config and world size), or
    ``None`` for a fresh run (refused when the folder already holds one)."""
    ckpt_path = run_dir / "ckpt.pt"
    if not resume:
        if ckpt_path.exists():
            raise MfdetrError(
                "run folder already holds a checkpoint; pass --resume to continue it or choose another --out",
                path=run_dir,
            )
        return None
    if not ckpt_path.is_file():
        raise MfdetrError("nothing to resume: no ckpt.pt", path=run_dir)
    ckpt = load_checkpoint(ckpt_path)
    diff = [k for k in diff_configs(ckpt.get("config", {}), cfg_dict) if k not in RESUMABLE_CHANGES]
    if diff:
        raise MfdetrError(f"cannot resume with a different config (differs in: {', '.join(diff[:8])})", path=run_dir)
    was = int(ckpt.get("meta", {}).get("world_size", ctx.world_size))
    if was != ctx.world_size:
        raise MfdetrError(
            f"run was started with {was} processes, now {ctx.world_size}: the data order "
            "depends on the global batch; resume with the same world size",
            path=run_dir,
        )
    return ckpt


def _run_meta(
    cfg: RunConfig, ctx: DistContext, plan: EpochPlan, lr: float, total: int, use_amp: bool, amp_dtype: torch.dtype
) -> dict[str, Any]:
    """What ``run.json`` and every checkpoint record about where and how the run trains."""
    return {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "batch_size_per_process": cfg.train.batch_size,
        "global_batch": plan.global_batch,
        "lr": lr,
        "total_steps": total,
        "steps_per_epoch": plan.steps_per_epoch,
        "amp": (str(amp_dtype).replace("torch.", "") if use_amp else "fp32"),
        "versions": library_versions(),
        "command": python_command(),
    }


def _write_records(run_dir: Path, cfg_dict: dict[str, Any], meta: dict[str, Any], start: int, resume: bool) -> None:
    """``config.json`` and ``run.json`` (with one ``launches`` entry per start of the run)."""
    atomic_write_text(run_dir / "config.json", json.dumps(cfg_dict, indent=2) + "\n")
    runs = json.loads((run_dir / "run.json").read_text()) if resume and (run_dir / "run.json").exists() else {}
    launches = list(runs.get("launches", [])) + [{"start_step": start, "time": time.time()}]
    atomic_write_text(run_dir / "run.json", json.dumps({**meta, "launches": launches}, indent=2) + "\n")


def _hooks(
    cfg: RunConfig,
    ctx: DistContext,
    plan: EpochPlan,
    sched: StepDecay,
    total: int,
    run_dir: Path,
    extra: Callable[[int], Mapping[str, Any]],
    evaluate_fn: EvaluateFn | None,
    open_log: Callable[[int], MetricLogger] | None,
) -> tuple[list[HookBase], Checkpointer, Evaluation | None]:
    """The stage-2 hooks, in the order they run: seed, lr, log, bar, checkpoint, evaluation."""
    tc = cfg.train
    ckpt = Checkpointer(run_dir / "ckpt.pt", every=tc.checkpoint_every, keep=tc.keep_checkpoints, extra=extra)
    log = MetricsLog(open_log, every=tc.log_every, epoch_of=lambda s: plan.locate(s)[0])
    hooks: list[HookBase] = [StepSeed(tc.seed), LRSchedule(sched), log]
    if ctx.is_main and tc.progress:
        hooks.append(Progress(total))
    hooks.append(ckpt)
    ev = None
    if evaluate_fn is not None:

        def report(step: int, m: dict[str, Any]) -> None:
            log.log("eval", step, m)
            _say(ctx, f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))

        ev = Evaluation(
            lambda net, step: {k: float(v) for k, v in evaluate_fn(net, step).items()},
            when=lambda s: bool(tc.eval_every) and s % tc.eval_every == 0,
            report=report,
        )
        hooks.append(ev)
    return hooks, ckpt, ev


def _train(
    *,
    cfg: RunConfig,
    model: nn.Module | TrainModel,
    train_set: Dataset[Any],
    run_dir: str | Path,
    criterion: Criterion | None = None,
    collate: Callable[[list[Any]], Any] = collate_detector_outputs,
    resume: bool = False,
    masknet_config: Mapping[str, Any] | None = None,
    manifest_sha256: str | None = None,
    evaluate_fn: EvaluateFn | None = None,
    record: Mapping[str, Any] | None = None,
    ctx: DistContext | None = None,
    prepare_batch: Callable[[Any, torch.device], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_set``; write the run folder; return a summary.

    Args:
        cfg: the run config (``cfg.train`` drives the loop; the whole config is recorded).
        model: what is trained (:class:`~mfdetr.engine.training.loop.TrainModel`), or a network called
            ``model(det)`` whose outputs ``criterion`` scores (:class:`~mfdetr.engine.training.models.Supervised`);
            already built (seed with :func:`seed_everything` first).
        criterion: ``(outputs, det, targets) -> losses`` (with a bare network); must contain ``total`` or ``loss``.
        train_set: map-style dataset; ``len`` = number of training images.
        run_dir: the run folder (created).
        collate: batches items; its result has ``to(device)`` and ``len`` and unpacks into ``(det, targets)``.
        resume: continue from ``run_dir/ckpt.pt`` (exactly, see the module docstring).
        masknet_config: the resolved MaskNet config recorded in checkpoints (default ``cfg.masknet``).
        manifest_sha256, record: the training cache's manifest hash and extra entries for ``run.json``.
        evaluate_fn: called on rank 0 every ``eval_every`` steps and at the end; results are logged.
        ctx: distributed context (default: from torchrun's environment).
        prepare_batch: turns a collated batch into the device batch (default ``batch.to(device)``);
            the online mode runs the frozen detector here (:mod:`mfdetr.engine.online`).
    """
    tc = cfg.train
    ctx = ctx or init_distributed(tc.device)
    run_dir = Path(run_dir)
    cfg_dict = cfg.to_dict()
    ckpt = _resume_state(cfg_dict, run_dir, resume, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(ctx)

    model, groups = _as_train_model(model, criterion, ctx.device)
    plan, total, lr = _schedule_of(tc, len(train_set), ctx)  # type: ignore[arg-type]
    sched = StepDecay(base_lr=lr, total_steps=total, drop_at=tc.lr_drop_at, factor=tc.lr_drop_factor)
    amp = AmpSettings(*amp_settings(tc.amp, ctx.device))
    meta = {
        **_run_meta(cfg, ctx, plan, lr, total, amp.enabled, amp.dtype),
        "num_train_images": plan.num_items,
        "manifest_sha256": manifest_sha256,
        "trainable_params": _numel(groups),
        **dict(record or {}),
    }
    mcfg = dict(masknet_config if masknet_config is not None else cfg.masknet)
    open_log = (lambda start: MetricLogger(run_dir, resume_step=start if resume else None)) if ctx.is_main else None

    def extra(step: int) -> dict[str, Any]:  # what every checkpoint records besides the state
        return {"epoch": plan.locate(step)[0], "config": cfg_dict, "masknet_config": mcfg, "meta": meta}

    hooks, saver, ev = _hooks(cfg, ctx, plan, sched, total, run_dir, extra, evaluate_fn, open_log)
    data = LoaderData(
        train_set,
        plan,
        collate=collate,
        prepare=prepare_batch,
        pin_memory=ctx.device.type == "cuda",
        num_workers=tc.num_workers,
        prefetch_factor=tc.prefetch_factor,
    )
    trainer = _make_trainer(
        tc, ctx, model, groups, data, lr=lr, total=total, hooks=hooks, saver=saver, amp=amp, ckpt=ckpt
    )
    _say(ctx, _start_line(tc, ctx, plan, meta, lr=lr, total=total, step=trainer.step))
    if ctx.is_main:
        _write_records(run_dir, cfg_dict, meta, trainer.step, resume)
    trainer.train()
    _say(ctx, f"done: {trainer.step} steps, checkpoint {saver.path}")
    return _result(trainer, run_dir, plan, lr=lr, total=total, ev=ev)


def _start_line(
    tc: TrainConfig, ctx: DistContext, plan: EpochPlan, meta: Mapping[str, Any], *, lr: float, total: int, step: int
) -> str:
    return (
        f"training {total} steps ({plan.steps_per_epoch}/epoch) on {ctx.world_size} process(es) "
        f"[{meta['device']}, {meta['amp']}]: global batch {plan.global_batch} "
        f"({tc.batch_size} x {ctx.world_size}), lr {lr:g}" + (f"; resuming at step {step}" if step else "")
    )


def _numel(groups: list[dict[str, Any]]) -> int:
    return sum(p.numel() for g in groups for p in g["params"])


def _result(
    trainer: Trainer, run_dir: Path, plan: EpochPlan, *, lr: float, total: int, ev: Evaluation | None
) -> TrainResult:
    """The summary of a finished run: its last logged losses and the final evaluation."""
    last = {k: v for k, v in (trainer.logged or {}).items() if k not in ("lr", "img_s")}
    return TrainResult(
        run_dir=run_dir,
        steps=trainer.step,
        total_steps=total,
        global_batch=plan.global_batch,
        lr=lr,
        last_losses=last,
        eval_metrics=ev.metrics if ev is not None else {},
    )


def _as_train_model(
    model: nn.Module | TrainModel, criterion: Criterion | None, device: torch.device
) -> tuple[TrainModel, list[dict[str, Any]]]:
    """``model`` as a :class:`TrainModel` (a bare network scored by ``criterion``) on ``device``, and its
    parameter groups; a model with nothing to train is refused."""
    if not isinstance(model, TrainModel):
        if criterion is None:
            raise TypeError("a bare network needs a criterion")
        model = Supervised(model, criterion)
    model.to(device)
    groups = model.param_groups()
    if not any(True for g in groups for _p in g["params"]):
        raise MfdetrError("the model has no trainable parameters (a training-free config: use `mfdetr eval`)")
    return model, groups


def _schedule_of(tc: TrainConfig, num_items: int, ctx: DistContext) -> tuple[EpochPlan, int, float]:
    """The run's epoch plan, its total steps and its learning rate (scaled by the global batch)."""
    plan = EpochPlan(
        num_items=num_items, batch_size=tc.batch_size, world_size=ctx.world_size, rank=ctx.rank, seed=tc.seed
    )
    total = tc.iterations if tc.iterations > 0 else tc.epochs * plan.steps_per_epoch
    lr = tc.lr * (plan.global_batch / tc.reference_batch if tc.reference_batch > 0 else 1.0)
    return plan, total, lr


def _make_trainer(
    tc: TrainConfig,
    ctx: DistContext,
    model: TrainModel,
    groups: list[dict[str, Any]],
    data: LoaderData,
    *,
    lr: float,
    total: int,
    hooks: list[HookBase],
    saver: Checkpointer,
    amp: AmpSettings,
    ckpt: dict[str, Any] | None,
) -> Trainer:
    """The loop: AdamW over ``groups``, stopping at ``total`` steps, restored from ``ckpt`` when resuming;
    an interrupt or a non-finite loss ends it with one line naming the checkpoint."""
    trainer = Trainer(
        model=model,
        data=data,
        optimizer=make_adamw(groups, lr=lr, betas=tc.betas, weight_decay=tc.weight_decay),
        hooks=hooks,
        ctx=ctx,
        start=0,
        stop=total,
        amp=amp,
        clip_grad_norm=tc.clip_grad_norm,
        find_unused_parameters=tc.find_unused_parameters,
        interrupt=lambda t: KeyboardInterrupt() if ctx.distributed else Interrupted(step=t.step, checkpoint=saver.path),
        nonfinite=lambda t, losses, ids: _nonfinite(t, losses, ids, saver),
    )
    if ckpt is not None:
        load_weights(model.network, ckpt["model"], path=saver.path, what="this run's model")
        restore(trainer, ckpt, path=saver.path)
    return trainer


def _nonfinite(trainer: Trainer, losses: Mapping[str, Tensor], image_ids: list[Any], saver: Checkpointer) -> Exception:
    """Stop on a non-finite loss with one line naming the step and the batch's images (no update made)."""
    parts = ", ".join(f"{k} {float(v.detach()):g}" for k, v in losses.items())
    return MfdetrError(
        f"non-finite loss at step {trainer.step + 1} on image ids {image_ids} ({parts}); "
        f"training stopped, {saver.kept()}"
    )


__all__ = ["RESUMABLE_CHANGES", "TrainResult", "amp_settings", "seed_everything", "train"]
