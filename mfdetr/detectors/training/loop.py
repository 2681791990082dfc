"""Seeded, resumable training of a DINO preset from scratch (the ``demo`` detector's recipe).

One run = one output folder::

    OUT/config.json       the resolved config
    OUT/checkpoint.pt     latest training state (model, optimizer, step) — written atomically
    OUT/log.jsonl         one JSON line per logged step / evaluation
    OUT/weights.pt        the final (or exported) detector weights ``{"model": state_dict}``

Determinism: the model init comes from ``torch.manual_seed(seed)``, the batches of epoch ``e`` from
:func:`~mfdetr.detectors.training.data.epoch_batches` (seeded shuffle, one orientation per batch) and
the flips from ``[seed, epoch, index]``, so a run resumed from any checkpoint sees the same batches as
an uninterrupted one. Optimiser: AdamW, one learning rate for every parameter (nothing is pretrained)
except the deformable-attention ``sampling_offsets`` and ``reference_points`` projections, which get
``lr · linear_proj_lr_mult`` (Deformable DETR / DINO: 0.1); all multiplied by ``lr_drop_factor`` from
epoch ``lr_drop_epoch`` on; gradient-norm clipping (DINO: 0.1).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.config import to_dict
from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.model import DinoDetector, build_dino_model
from mfdetr.detectors.registry import get_preset
from mfdetr.detectors.training.criterion import SetCriterion
from mfdetr.detectors.training.data import DetectionTrainSet, epoch_batches, min_batches
from mfdetr.detectors.training.denoising import prepare_cdn
from mfdetr.detectors.training.evaluate import box_ap
from mfdetr.detectors.training.forward import dino_train_forward, init_for_training, trainable_model
from mfdetr.detectors.training.matcher import HungarianMatcher
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write

#: the shipped checkpoint must stay below this size
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024


@dataclass
class DataOptions:
    """Where the COCO-format data lives and how much of it to use."""

    root: str = ""
    train_split: str = "train2017"
    val_split: str = "val2017"
    max_train_images: int = 0
    val_images: int = 0
    hflip: float = 0.5
    #: batches of one input size (no padding: train as the cache and evaluation run the detector) or,
    #: when False, of one orientation (for data with many sizes)
    batch_by_size: bool = True


@dataclass
class OptimOptions:
    """Schedule and optimiser."""

    seed: int = 0
    batch_size: int = 8
    epochs: int = 8
    lr: float = 2e-4
    lr_drop_epoch: int = 7
    lr_drop_factor: float = 0.1
    weight_decay: float = 1e-4
    clip_grad_norm: float = 0.1
    linear_proj_lr_mult: float = 0.1
    threads: int = 2
    log_every: int = 20
    checkpoint_every: int = 100
    eval_every_epochs: int = 1


@dataclass
class LossOptions:
    """Loss and matching weights (DINO's defaults)."""

    weight_ce: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    aux: bool = True
    enc: bool = True
    #: contrastive denoising (DINO's CDN): ``dn_number`` noised GT copies per batch (0 = off; DINO: 100)
    dn_number: int = 0
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 0.4


@dataclass
class DetTrainConfig:
    """A detector training recipe (``pipeline/detectors/demo_dino.toml``)."""

    preset: str = "demo"
    data: DataOptions = field(default_factory=DataOptions)
    train: OptimOptions = field(default_factory=OptimOptions)
    loss: LossOptions = field(default_factory=LossOptions)


def build_trainable(preset_name: str, *, seed: int) -> DinoDetector:
    """A freshly initialised, trainable DINO of a registered preset (seeded)."""
    preset = get_preset(preset_name)
    if preset.family != "dino":
        raise MfdetrError(f"detector training supports DINO presets only, {preset_name!r} is {preset.family!r}")
    torch.manual_seed(seed)
    model = build_dino_model(DinoConfig.from_dict(preset.arch), preset=preset)
    return trainable_model(init_for_training(model))  # type: ignore[return-value]


def weights_state(model: torch.nn.Module, *, max_bytes: int = MAX_WEIGHTS_BYTES) -> dict[str, torch.Tensor]:
    """The model's state dict for shipping: float32, or float16 floats when float32 would exceed
    ``max_bytes``. Keys that alias one tensor (shared decoder heads) keep sharing it, so the file
    stores it once."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    unique = {v.data_ptr(): v for v in sd.values()}
    if sum(v.numel() * v.element_size() for v in unique.values()) > max_bytes:
        half = {p: (v.half() if v.is_floating_point() else v) for p, v in unique.items()}
        sd = {k: half[v.data_ptr()] for k, v in sd.items()}
    return sd


def save_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Write ``{"model": state_dict}`` (see :func:`weights_state`) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": weights_state(model)}
    atomic_write(path, lambda f: torch.save(state, f), what="weights")
    return path


#: parameter-name parts that get ``linear_proj_lr_mult`` (official ``lr_linear_proj_names``)
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def _lr_at(cfg: OptimOptions, epoch: int) -> float:
    return cfg.lr * (cfg.lr_drop_factor if epoch >= cfg.lr_drop_epoch else 1.0)


def param_groups(model: torch.nn.Module, cfg: OptimOptions) -> list[dict[str, Any]]:
    """AdamW groups: the deformable sampling projections (``lr_mult = linear_proj_lr_mult``), the rest
    (``lr_mult = 1``). Empty groups are left out."""
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if any(k in name for k in LINEAR_PROJ_NAMES) else rest).append(p)
    groups = [{"params": rest, "lr_mult": 1.0}, {"params": proj, "lr_mult": cfg.linear_proj_lr_mult}]
    return [g for g in groups if g["params"]]


def train_detector(cfg: DetTrainConfig, out: str | Path, *, resume: bool = True, max_steps: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) a detector; returns a summary (steps, seconds, last losses, last AP).

    Args:
        cfg: the recipe; out: the run folder.
        resume: continue from ``out/checkpoint.pt`` when it exists.
        max_steps: stop after this global step (tests, smoke runs); the schedule is unchanged.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    o = cfg.train
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    if not cfg.data.root:
        raise MfdetrError("data.root is not set: pass the COCO-format folder (e.g. data.root=DIR)")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    model = build_trainable(cfg.preset, seed=o.seed)
    preset = model.preset
    train_set = DetectionTrainSet(cfg.data.root, cfg.data.train_split, preprocessing=preset.preprocessing,
                                  class_to_category=preset.class_to_category, max_images=cfg.data.max_train_images,
                                  by_size=cfg.data.batch_by_size)
    steps_per_epoch = min_batches(train_set.groups, o.batch_size)  # every epoch has at least this many
    if steps_per_epoch <= 0:
        raise MfdetrError(f"{len(train_set)} training images < batch size {o.batch_size}")
    total = steps_per_epoch * o.epochs
    criterion = SetCriterion(
        matcher=HungarianMatcher(cost_class=cfg.loss.cost_class, cost_bbox=cfg.loss.cost_bbox,
                                 cost_giou=cfg.loss.cost_giou),
        weight_ce=cfg.loss.weight_ce, weight_bbox=cfg.loss.weight_bbox, weight_giou=cfg.loss.weight_giou,
        aux=cfg.loss.aux, enc=cfg.loss.enc)
    groups = param_groups(model, o)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log(f"resumed from {ckpt_path} at step {step}/{total}")

    def save_state() -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "config": json.dumps(to_dict(cfg))}
        atomic_write(ckpt_path, lambda f: torch.save(state, f), what="checkpoint")

    logf = (out / "log.jsonl").open("a")

    def record(row: dict[str, Any]) -> None:
        logf.write(json.dumps(row) + "\n")
        logf.flush()

    last: dict[str, Any] = {}
    stop = total if max_steps is None else min(total, max_steps)
    t0 = time.time()
    seen = 0
    batches: list[list[int]] = []
    model.train()
    try:
        while step < stop:
            epoch, pos = divmod(step, steps_per_epoch)
            if pos == 0 or not batches:
                batches = epoch_batches(train_set.groups, o.batch_size, seed=o.seed, epoch=epoch)
            lr = _lr_at(o, epoch)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            idx = batches[pos]
            batch = train_set.batch(idx, epoch=epoch, seed=o.seed, hflip=cfg.data.hflip)
            dn = None
            if cfg.loss.dn_number > 0:  # the noise of step s is a function of (seed, s): exact resume
                dn = prepare_cdn(batch.targets, label_enc=model.label_enc, num_classes=preset.num_classes,
                                 num_queries=model.transformer.num_queries, dn_number=cfg.loss.dn_number,
                                 label_noise_ratio=cfg.loss.dn_label_noise_ratio,
                                 box_noise_scale=cfg.loss.dn_box_noise_scale,
                                 generator=torch.Generator().manual_seed(o.seed * 1_000_003 + step))
            fwd = dino_train_forward(model, batch.images, batch.pad_mask, dn)
            loss, parts = criterion(fwd, batch.targets)
            if not math.isfinite(parts["loss"]):
                raise MfdetrError(f"non-finite loss at step {step}: {parts}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, o.clip_grad_norm)
            opt.step()
            step += 1
            seen += len(idx)
            last = {"step": step, "epoch": epoch, "lr": lr, **parts}
            if step % o.log_every == 0 or step == stop:
                el = time.time() - t0
                row = {**last, "elapsed_s": round(el, 1), "img_per_s": round(seen / max(el, 1e-9), 2)}
                record(row)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if step % o.checkpoint_every == 0 or step == stop:
                save_state()
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch and o.eval_every_epochs > 0 and (step // steps_per_epoch) % o.eval_every_epochs == 0 \
                    and cfg.data.val_split:
                ap = box_ap(model, cfg.data.root, cfg.data.val_split, max_images=cfg.data.val_images)
                record({"step": step, "epoch": step // steps_per_epoch, "val": ap})
                log(f"step={step} val box " + " ".join(f"{k}={v:.2f}" for k, v in ap.items()))
                last["val"] = ap
                save_weights(model, out / f"weights_epoch{step // steps_per_epoch}.pt")
        save_state()
        if step >= total:
            save_weights(model, out / "weights.pt")
    finally:
        logf.close()
    return {**last, "steps": step, "total_steps": total, "seconds": round(time.time() - t0, 1)}


__all__ = ["MAX_WEIGHTS_BYTES", "DataOptions", "DetTrainConfig", "LossOptions", "OptimOptions", "build_trainable",
           "param_groups", "save_weights", "train_detector", "weights_state"]
