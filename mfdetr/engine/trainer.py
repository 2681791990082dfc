"""The stage-2 training loop: AdamW + step decay, AMP, clipping, DDP, logging, exact resume.

Everything the loop trains is injected: the model (``forward(det) -> outputs``), the criterion
(``criterion(outputs, det, targets) -> {"total" | "loss": Tensor, ...}``), the training Dataset
(items ``(DetectorOutput B=1, GTInstances)``) and its collate function, and an optional
``evaluate_fn(model, step) -> {metric: value}``. The engine never builds a MaskNet or opens a cache
itself, so the same loop trains from the cache, online, or a toy model in tests.

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
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mfdetr.engine.checkpoint import (atomic_torch_save, atomic_write_text, capture_rng, library_versions,
                                      load_checkpoint, load_weights, python_command, restore_rng, seed_step)
from mfdetr.engine.collate import collate_detector_outputs
from mfdetr.engine.config import RunConfig, diff_configs
from mfdetr.engine.distributed import DistContext, agree, all_reduce_mean, barrier, init_distributed
from mfdetr.engine.loading import RunBatches, loader_options
from mfdetr.engine.metrics import MetricLogger
from mfdetr.engine.sampling import EpochPlan
from mfdetr.engine.schedule import StepDecay
from mfdetr.errors import Interrupted, MfdetrError
from mfdetr.interrupts import interruptible
from mfdetr.outputs import exclusive_folder

Criterion = Callable[[Any, Any, Any], Mapping[str, Tensor]]
EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]

# Settings that may change between a run and its resumption without changing any result.
RESUMABLE_CHANGES = {"train.progress", "train.num_workers", "train.prefetch_factor", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.eval_every", "train.device"}


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _loss_total(losses: Mapping[str, Tensor]) -> Tensor:
    for key in ("total", "loss"):
        if key in losses:
            return losses[key]
    raise KeyError(f"criterion returned no 'total' or 'loss' entry (keys: {sorted(losses)})")


def _batch_image_ids(det: Any, targets: Any) -> list[Any]:
    """The image ids of a batch (from the GT instances, else the detector output's extras)."""
    ids = [getattr(t, "image_id", None) for t in targets] if isinstance(targets, list | tuple) else []
    if ids and all(i is not None for i in ids):
        return ids
    return list(getattr(det, "extras", {}).get("image_id", []))


def _refuse_nonfinite(loss: Tensor, losses: Mapping[str, Tensor], step: int, det: Any, targets: Any,
                      ckpt_path: Path) -> None:
    """Stop on a non-finite loss with one line naming the step and the batch's images (no update made)."""
    if bool(torch.isfinite(loss)):
        return
    parts = ", ".join(f"{k} {float(v.detach()):g}" for k, v in losses.items())
    kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else "no checkpoint was written"
    raise MfdetrError(f"non-finite loss at step {step + 1} on image ids {_batch_image_ids(det, targets)} "
                      f"({parts}); training stopped, {kept}")


def _guarded(items: Any) -> Any:
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


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: ``model.param_groups()`` when the model defines it (groups with
    an ``lr_scale`` relative to the scheduled lr, e.g. a fine-tuned detector at 1/10), else one group of
    every trainable parameter."""
    fn = getattr(model, "param_groups", None)
    if callable(fn):
        return [g for g in fn() if g["params"]]
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]


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


def _train(*, cfg: RunConfig, model: nn.Module, criterion: Criterion, train_set: Dataset[Any],
          run_dir: str | Path, collate: Callable[[list[Any]], Any] = collate_detector_outputs,
          resume: bool = False, masknet_config: Mapping[str, Any] | None = None,
          manifest_sha256: str | None = None, evaluate_fn: EvaluateFn | None = None,
          record: Mapping[str, Any] | None = None, ctx: DistContext | None = None,
          prepare_batch: Callable[[Any, torch.device], Any] | None = None) -> TrainResult:
    """Train ``model`` on ``train_set``; write the run folder; return a summary.

    Args:
        cfg: the run config (``cfg.train`` drives the loop; the whole config is recorded).
        model: the trainable network, already built (seed with :func:`seed_everything` first); called as
            ``model(det)``, or ``model(det, targets, step=step)`` when it has ``takes_targets = True``
            (it assigns the targets itself, e.g. :class:`~mfdetr.masknet.positives.PositivesOnly`).
        criterion: ``(outputs, det, targets) -> losses``; must contain ``total`` or ``loss``.
        train_set: map-style dataset; ``len`` = number of training images.
        run_dir: the run folder (created).
        collate: batches items; its result must have ``to(device)`` and ``len``, and unpack into
            ``(det, targets)`` (:class:`~mfdetr.engine.collate.Stage2Batch` does).
        resume: continue from ``run_dir/ckpt.pt`` (exactly, see the module docstring).
        masknet_config: the resolved MaskNet config recorded in checkpoints (default ``cfg.masknet``).
        manifest_sha256: hash of the training cache's manifest (recorded in ``run.json``).
        evaluate_fn: called on rank 0 every ``eval_every`` steps and at the end; results are logged.
        record: extra entries for ``run.json`` (e.g. cache paths, model complexity).
        ctx: distributed context (default: from torchrun's environment).
        prepare_batch: turns a collated batch into the device batch (default ``batch.to(device)``);
            the online mode runs the frozen detector here (:mod:`mfdetr.engine.online`).
    """
    tc = cfg.train
    ctx = ctx or init_distributed(tc.device)
    device = ctx.device
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "ckpt.pt"
    mcfg = dict(masknet_config if masknet_config is not None else cfg.masknet)
    cfg_dict = cfg.to_dict()

    # ---- resume / fresh-run checks (every rank reads the same files) ----
    ckpt: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise MfdetrError("nothing to resume: no ckpt.pt", path=run_dir)
        ckpt = load_checkpoint(ckpt_path)
        diff = [k for k in diff_configs(ckpt.get("config", {}), cfg_dict) if k not in RESUMABLE_CHANGES]
        if diff:
            raise MfdetrError(f"cannot resume with a different config (differs in: {', '.join(diff[:8])})",
                              path=run_dir)
        was = int(ckpt.get("meta", {}).get("world_size", ctx.world_size))
        if was != ctx.world_size:
            raise MfdetrError(f"run was started with {was} processes, now {ctx.world_size}: the data order "
                              "depends on the global batch; resume with the same world size", path=run_dir)
    elif ckpt_path.exists():
        raise MfdetrError("run folder already holds a checkpoint; pass --resume to continue it or choose "
                          "another --out", path=run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(ctx)

    # ---- model, optimiser, schedule, AMP ----
    model.to(device)
    if isinstance(criterion, nn.Module):
        criterion.to(device)
    groups = _param_groups(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise MfdetrError("the model has no trainable parameters (a training-free config: use `mfdetr eval`)")
    plan = EpochPlan(num_items=len(train_set), batch_size=tc.batch_size, world_size=ctx.world_size,  # type: ignore[arg-type]
                     rank=ctx.rank, seed=tc.seed)
    total = tc.iterations if tc.iterations > 0 else tc.epochs * plan.steps_per_epoch
    lr = tc.lr * (plan.global_batch / tc.reference_batch if tc.reference_batch > 0 else 1.0)
    sched = StepDecay(base_lr=lr, total_steps=total, drop_at=tc.lr_drop_at, factor=tc.lr_drop_factor)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tc.betas, weight_decay=tc.weight_decay)
    use_amp, amp_dtype = amp_settings(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start, window = 0, {}
    if ckpt is not None:
        load_weights(_unwrap(model), ckpt["model"], path=ckpt_path, what="this run's model")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            start = int(ckpt["step"])
            window = {k: list(v) for k, v in ckpt.get("log_window", {}).items()}
            rng = ckpt.get("rng", {}).get(ctx.rank)
            if rng is not None:
                restore_rng(rng)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise MfdetrError(f"damaged checkpoint: cannot restore the training state ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]})", path=ckpt_path) from None

    net: nn.Module = model
    if ctx.distributed:
        # a fine-tuned detector has parameters MaskNet's losses never reach (e.g. its class heads)
        unused = tc.find_unused_parameters or bool(getattr(model, "has_unused_parameters", False))
        net = nn.parallel.DistributedDataParallel(model, device_ids=None, find_unused_parameters=unused)

    meta = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(device),
            "batch_size_per_process": tc.batch_size, "global_batch": plan.global_batch, "lr": lr,
            "total_steps": total, "steps_per_epoch": plan.steps_per_epoch, "num_train_images": len(train_set),  # type: ignore[arg-type]
            "amp": (str(amp_dtype).replace("torch.", "") if use_amp else "fp32"),
            "manifest_sha256": manifest_sha256, "versions": library_versions(),
            "trainable_params": sum(p.numel() for p in params), "command": python_command(),
            **dict(record or {})}
    _say(ctx, f"training {total} steps ({plan.steps_per_epoch}/epoch) on {ctx.world_size} process(es) "
              f"[{meta['device']}, {meta['amp']}]: global batch {plan.global_batch} "
              f"({tc.batch_size} x {ctx.world_size}), lr {lr:g}"
              + (f"; resuming at step {start}" if start else ""))
    logger: MetricLogger | None = None
    if ctx.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg_dict, indent=2) + "\n")
        runs = json.loads((run_dir / "run.json").read_text()) if resume and (run_dir / "run.json").exists() else {}
        launches = list(runs.get("launches", [])) + [{"start_step": start, "time": time.time()}]
        atomic_write_text(run_dir / "run.json", json.dumps({**meta, "launches": launches}, indent=2) + "\n")
        logger = MetricLogger(run_dir, resume_step=start if resume else None)

    def save(step: int) -> None:
        bad = [n for n, p in _unwrap(model).named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise MfdetrError(f"non-finite weights after step {step} ({', '.join(bad[:4])}): not saved, "
                              f"{'the last good checkpoint is kept' if ckpt_path.is_file() else 'no checkpoint'}",
                              path=ckpt_path)
        rngs = [capture_rng()]
        if ctx.distributed:
            gathered: list[Any] = [None] * ctx.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if ctx.is_main:
            state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "schedule": sched.state_dict(), "step": step, "epoch": plan.locate(step)[0],
                     "rng": dict(enumerate(rngs)), "log_window": window, "config": cfg_dict,
                     "masknet_config": mcfg, "meta": meta}
            try:
                atomic_torch_save(state, ckpt_path)
                if tc.keep_checkpoints:
                    atomic_torch_save(state, run_dir / f"ckpt_{step:07d}.pt")
            except Exception as e:  # noqa: BLE001 - every process stops with it
                agree(ctx, e)
        agree(ctx, None)

    eval_metrics: dict[str, float] = {}

    def run_eval(step: int) -> None:
        nonlocal eval_metrics
        if evaluate_fn is None:
            return
        failed = None
        if ctx.is_main:
            _unwrap(model).eval()
            try:
                with torch.no_grad():
                    eval_metrics = {k: float(v) for k, v in evaluate_fn(_unwrap(model), step).items()}
            except Exception as e:  # noqa: BLE001 - every process stops with it
                failed = e
            _unwrap(model).train()
        agree(ctx, failed)
        if ctx.is_main:
            assert logger is not None
            logger.log("eval", step, eval_metrics)
            _say(ctx, f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()))

    runs_detector = bool(getattr(_unwrap(model), "runs_detector", False))
    # a model that assigns targets itself (MaskNet on the positives only) gets them, and the step, in forward
    takes_targets = bool(getattr(_unwrap(model), "takes_targets", False))
    progress = None
    if ctx.is_main and tc.progress:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)
    last: dict[str, float] = {}
    step = start

    def interrupted() -> BaseException:
        if progress is not None:
            progress.close()
        if ctx.distributed:  # ranks may stop at different points: the last periodic checkpoint resumes
            return KeyboardInterrupt()
        save(step)
        if logger is not None:
            logger.close()
        return Interrupted(step=step, checkpoint=ckpt_path)

    model.train()
    t_window, n_window = time.perf_counter(), 0
    per_epoch = callable(getattr(train_set, "set_epoch", None))  # per-epoch augmentation draws (LSJ)
    while step < total:
        epoch, pos = plan.locate(step)
        batches: Any = RunBatches(plan, step, total)  # one loader for the run: workers start once
        if per_epoch:
            train_set.set_epoch(epoch)  # type: ignore[attr-defined]
            batches = plan.rank_batches(epoch, pos)[: total - step]
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate, pin_memory=device.type == "cuda",
                            **loader_options(tc.num_workers, tc.prefetch_factor))
        # every process agrees before each collective step (DDP's forward and backward): an error in one
        # (a damaged cache image, a non-finite loss) stops them all instead of leaving the others waiting
        for batch, failed in interruptible(_guarded(loader), interrupted):
            epoch = plan.locate(step)[0]
            seed_step(tc.seed, step, ctx.rank)
            cur_lr = sched.apply(optimizer, step)
            try:
                if failed is None:
                    batch = prepare_batch(batch, device) if prepare_batch is not None else batch.to(device)
            except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises it
                failed = e
            agree(ctx, failed)
            det, targets = batch
            fwd_args, fwd_kw = ((targets,), {"step": step}) if takes_targets else ((), {})
            try:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    if runs_detector:  # fine-tuning: the model runs the detector on the images itself
                        outputs, det = net(det, *fwd_args, **fwd_kw)
                    else:
                        outputs = net(det, *fwd_args, **fwd_kw)
                    losses = criterion(outputs, det, targets)
                loss = _loss_total(losses)
                _refuse_nonfinite(loss, losses, step, det, targets, ckpt_path)
            except Exception as e:  # noqa: BLE001 - handed to agree(), which re-raises it
                failed = e
            agree(ctx, failed)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if tc.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            step += 1
            n_window += len(batch) * ctx.world_size
            vals = {("loss" if k in ("total", "loss") else k): float(v.detach()) for k, v in losses.items()}
            if grad_norm is not None:
                vals["grad_norm"] = grad_norm
            for k, v in vals.items():
                window.setdefault(k, []).append(v)
            if step % tc.log_every == 0 or step == total:
                means = all_reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, ctx)
                dt = time.perf_counter() - t_window
                img_s = n_window / dt if dt > 0 else math.nan
                last = means
                if logger is not None:
                    logger.log("train", step, {**means, "lr": cur_lr, "img_s": img_s}, epoch=epoch)
                if progress is not None:
                    pos = {"pos_img": f"{means['pos_per_image']:.1f}"} if "pos_per_image" in means else {}
                    progress.set_postfix(loss=f"{means.get('loss', math.nan):.4f}", img_s=f"{img_s:.1f}",
                                         lr=f"{cur_lr:.2e}", **pos)
                window, t_window, n_window = {}, time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total:
                save(step)
            if tc.eval_every and step % tc.eval_every == 0 and step < total:
                run_eval(step)
    if progress is not None:
        progress.close()
    save(step)
    run_eval(step)
    if logger is not None:
        logger.close()
    _say(ctx, f"done: {step} steps, checkpoint {ckpt_path}")
    return TrainResult(run_dir=run_dir, steps=step, total_steps=total, global_batch=plan.global_batch, lr=lr,
                       last_losses=last, eval_metrics=eval_metrics)
