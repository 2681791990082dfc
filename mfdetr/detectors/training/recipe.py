"""The recipe of a DINO preset trained from scratch (the ``demo`` detector's): the config, the trainable
model, its optimiser groups and the shipped weights. The loop that runs it is the engine's
(:mod:`mfdetr.engine.training.detector`).

Optimiser: AdamW, one learning rate for every parameter (nothing is pretrained) except the
deformable-attention ``sampling_offsets`` and ``reference_points`` projections, which get
``lr · linear_proj_lr_mult`` (Deformable DETR / DINO: 0.1); all multiplied by ``lr_drop_factor`` from
epoch ``lr_drop_epoch`` on; gradient-norm clipping (DINO: 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.model import DinoDetector, build_dino_model
from mfdetr.detectors.registry import get_preset
from mfdetr.detectors.training.forward import init_for_training, trainable_model
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


def param_groups(model: torch.nn.Module, cfg: OptimOptions) -> list[dict[str, Any]]:
    """AdamW groups: the deformable sampling projections (``lr_mult = linear_proj_lr_mult``), the rest
    (``lr_mult = 1``). Empty groups are left out."""
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if any(k in name for k in LINEAR_PROJ_NAMES) else rest).append(p)
    groups = [{"params": rest, "lr_mult": 1.0}, {"params": proj, "lr_mult": cfg.linear_proj_lr_mult}]
    return [g for g in groups if g["params"]]


__all__ = [
    "MAX_WEIGHTS_BYTES",
    "DataOptions",
    "DetTrainConfig",
    "LossOptions",
    "OptimOptions",
    "build_trainable",
    "param_groups",
    "save_weights",
    "weights_state",
]
