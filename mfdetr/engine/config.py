"""Typed stage-2 run configuration: ``[train]`` (optimisation, loop, logging) plus raw component tables.

A run recipe (``pipeline/recipes/*.toml``, ``pipeline/ablations/*.toml`` base) has the sections

- ``[train]`` — :class:`TrainConfig` (typed here; unknown keys refused);
- ``[masknet]`` / ``[loss]`` / ``[assign]`` — the mask network's, loss' and target assignment's tables, kept as plain data here and
  validated by ``mfdetr.masknet``'s config classes when :mod:`mfdetr.engine.stage2` builds the parts
  (this module does not import them, so those classes stay the single source of truth);
- ``[data]`` — :class:`DataConfig`.

Defaults follow the paper's experiment setup (Sec. 3.1): AdamW, lr 1.5e-4, betas (0.9, 0.999),
weight decay 5e-5, lr divided by 10 at 0.9 and 0.95 of the iterations, 6 epochs, batch 8.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mfdetr.config import apply_overrides, from_dict, load_toml, to_dict


@dataclass
class TrainConfig:
    """Optimisation and loop settings of one stage-2 training run.

    Args:
        lr: AdamW learning rate for the global batch (Sec. 3.1: 1.5e-4; at most 1); scaled linearly by
            ``global_batch / reference_batch`` only when ``reference_batch > 0``.
        betas: AdamW betas.
        weight_decay: AdamW weight decay (5e-5).
        lr_drop_at: fractions of the total iterations at which the lr is multiplied by
            ``lr_drop_factor`` (0.9 and 0.95, Sec. 3.1).
        batch_size: images per process and step (global batch = batch_size × world size).
        epochs: passes over the training set; ignored when ``iterations > 0``.
        iterations: total optimiser steps; 0 = derive from ``epochs``.
        clip_grad_norm: max total gradient L2 norm (0 disables), after AMP unscaling.
        amp: mixed precision on CUDA (``bf16``, ``fp16`` with a GradScaler, or ``off``); CPU always fp32.
        seed: seeds model init, the per-epoch data order and every step's randomness.
        num_workers: DataLoader worker processes per rank; ``prefetch_factor`` batches each.
        log_every: steps per JSONL/TensorBoard record (the record holds the window's mean loss).
        checkpoint_every: steps between periodic checkpoints (0 = only the final one).
        keep_checkpoints: also keep ``ckpt_<step>.pt`` copies of periodic checkpoints.
        eval_every: steps between validation runs when a validation set is given (0 = at the end only).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        find_unused_parameters: forwarded to DDP (needed only for variants with unused parameters).
        progress: show a tqdm bar (rank 0).
    """

    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    lr_drop_at: tuple[float, ...] = (0.9, 0.95)
    lr_drop_factor: float = 0.1
    reference_batch: int = 0
    batch_size: int = 8
    epochs: int = 6
    iterations: int = 0
    clip_grad_norm: float = 0.1
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    seed: int = 42
    num_workers: int = 2
    prefetch_factor: int = 2
    log_every: int = 20
    checkpoint_every: int = 2000
    keep_checkpoints: bool = False
    eval_every: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    find_unused_parameters: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        finite = {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "lr_drop_factor": self.lr_drop_factor,
            "clip_grad_norm": self.clip_grad_norm,
        }
        bad = [f"{k}={v}" for k, v in finite.items() if not math.isfinite(v)]
        if not all(map(math.isfinite, self.betas)):
            bad.append(f"betas={list(self.betas)}")
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be a finite number")
        if not 0.0 < self.lr <= 1.0:  # an AdamW step moves each weight by about lr: above 1 it only diverges
            raise ValueError(f"lr must lie in (0, 1], got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if any(not 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0 turns clipping off), got {self.clip_grad_norm}")
        if not 0.0 < self.lr_drop_factor <= 1.0:
            raise ValueError(f"lr_drop_factor must lie in (0, 1], got {self.lr_drop_factor}")
        if self.seed < 0 or self.reference_batch < 0:
            raise ValueError(f"seed and reference_batch must be >= 0, got {self.seed} and {self.reference_batch}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs < 1 and self.iterations < 1:
            raise ValueError("either epochs or iterations must be >= 1")
        if self.iterations < 0 or self.epochs < 0:
            raise ValueError("epochs and iterations must be >= 0")
        if any(not 0.0 < f <= 1.0 for f in self.lr_drop_at):
            raise ValueError(f"lr_drop_at fractions must lie in (0, 1], got {list(self.lr_drop_at)}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("num_workers must be >= 0 and prefetch_factor >= 1")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("checkpoint_every and eval_every must be >= 0")


@dataclass
class DataConfig:
    """Stage-2 data settings.

    Args:
        require_complete: refuse an incomplete cache instead of training on its complete images.
        max_images: use only the first N images of the cache (0 = all) — for smoke runs.
        memory_cache_mb: MiB of read training images each process keeps in memory, so later epochs do not
            read and decode them again (0 = off); with DataLoader workers, split evenly among them.

    Which cached encoder layer feeds MaskNet is ``masknet.enc_layer`` (Table 15).
    """

    require_complete: bool = False
    max_images: int = 0
    memory_cache_mb: int = 1024

    def __post_init__(self) -> None:
        if self.memory_cache_mb < 0:
            raise ValueError(f"memory_cache_mb must be >= 0 (0 turns it off), got {self.memory_cache_mb}")


@dataclass
class OnlineConfig:
    """Settings of the online mode only (``mfdetr train --online``); a cached run refuses non-defaults.

    Args:
        lsj: large-scale jitter of the training images (paper Table 13; :class:`mfdetr.data.LargeScaleJitter`).
        lsj_size: the LSJ window side ``T`` (detectron2: 1024 for COCO; the ``demo`` detector's images: 224).
        lsj_min_scale, lsj_max_scale: range of the LSJ scale (0.1 .. 2.0).
        finetune: train the detector too (paper Table 11): ``none`` (frozen, the paper's method),
            ``transformer`` (partial: the transformer encoder and decoder) or ``all`` (the whole DETR).
            Only MaskNet's losses reach it; it stays in ``eval()`` mode (frozen BN, inference queries).
        detector_lr_mult: the detector's learning rate relative to MaskNet's (Table 11: 1/10).
        round_features: round the detector's features through the cache's float16, so that online and
            cached training see identical inputs.
    """

    lsj: bool = False
    lsj_size: int = 1024
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0
    finetune: Literal["none", "transformer", "all"] = "none"
    detector_lr_mult: float = 0.1
    round_features: bool = True

    def __post_init__(self) -> None:
        if not all(map(math.isfinite, (self.lsj_min_scale, self.lsj_max_scale, self.detector_lr_mult))):
            raise ValueError("lsj_min_scale, lsj_max_scale and detector_lr_mult must be finite numbers")
        if self.lsj_size < 8 or not 0 < self.lsj_min_scale <= self.lsj_max_scale:
            raise ValueError(
                "need lsj_size >= 8 and 0 < lsj_min_scale <= lsj_max_scale, got "
                f"{self.lsj_size}, {self.lsj_min_scale}, {self.lsj_max_scale}"
            )
        if self.detector_lr_mult <= 0:
            raise ValueError(f"detector_lr_mult must be > 0, got {self.detector_lr_mult}")

    @property
    def is_default(self) -> bool:
        return self == OnlineConfig()


@dataclass
class RunConfig:
    """A whole stage-2 recipe: typed ``train``/``data``/``online`` sections, ``masknet``/``loss``/``assign``
    as plain tables."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    masknet: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    assign: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def build_run_config(data: Mapping[str, Any], overrides: Sequence[str] = (), *, where: str = "config") -> RunConfig:
    """A :class:`RunConfig` from plain data plus ``section.key=value`` overrides (unknown keys refused)."""
    merged = apply_overrides(dict(data), overrides)
    return from_dict(RunConfig, merged, where=where)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data = load_toml(path) if path is not None else {}
    return build_run_config(data, overrides, where=str(path) if path is not None else "config")


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configs (for resume checks)."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_configs(va, vb, key + ".")
        elif _norm(va) != _norm(vb):
            out.append(key)
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    return v


def replace_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``cfg`` with some ``train`` fields replaced."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def with_default_enc_layer(cfg: RunConfig, layer: int) -> RunConfig:
    """``cfg`` with ``masknet.enc_layer = layer`` unless the recipe or an override set it (the default
    layer comes from the detector: two thirds of its encoder depth)."""
    if "enc_layer" in cfg.masknet:
        return cfg
    return dataclasses.replace(cfg, masknet={**cfg.masknet, "enc_layer": int(layer)})


__all__ = [
    "TrainConfig",
    "DataConfig",
    "OnlineConfig",
    "RunConfig",
    "build_run_config",
    "load_run_config",
    "diff_configs",
    "replace_train",
    "with_default_enc_layer",
]
