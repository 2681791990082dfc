"""Architecture config and preset metadata shared by the deformable DETR families.

A family config subclasses :class:`DetrArchConfig` (frozen dataclass, plain data, any size) and adds
its own fields; :func:`family_preset` turns a config into the :class:`~mfdetr.contracts.DetectorPreset`
the registry, the cache manifest and the CLI see; :func:`register_family` registers a table of
presets with one builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from mfdetr.config import from_dict
from mfdetr.contracts import DetectorPreset, FrozenDetector, Preprocessing, coco91_identity
from mfdetr.detectors.backbones.factory import BackboneConfig
from mfdetr.detectors.registry import register_detector
from mfdetr.errors import MfdetrError

#: C1 channels (backbone stage 0) of the full-size backbone kinds
C1_CHANNELS = {"resnet": 256, "swin": 192, "focalnet": 192, "tiny": 8}
#: strides of backbone stages 0..3
BACKBONE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class DetrArchConfig:
    """Fields every deformable DETR family has.

    Args:
        backbone: which backbone and which stages feed the encoder (``out_indices``).
        hidden_dim: transformer width ``d`` (GroupNorm(32) needs ``d % 32 == 0``).
        nheads: attention heads (self-attention and deformable attention).
        enc_layers, dec_layers: encoder / decoder depth.
        dim_feedforward: FFN width.
        enc_n_points, dec_n_points: deformable sampling points per head and level.
        num_feature_levels: encoder levels; levels beyond the backbone's are stride-2 convs.
        num_classes: classification slots (91 for official COCO models).
        num_select: post-processing top-k over queries × classes.
    """

    backbone: BackboneConfig
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_feature_levels: int = 4
    num_classes: int = 91
    num_select: int = 100

    def __post_init__(self) -> None:
        n_backbone = len(self.backbone.out_indices)
        if self.num_feature_levels < n_backbone:
            raise MfdetrError(f"num_feature_levels ({self.num_feature_levels}) < backbone levels ({n_backbone})")
        if self.hidden_dim % 32 or self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise MfdetrError(
                f"hidden_dim ({self.hidden_dim}) must be a multiple of 32 (GroupNorm) and of nheads ({self.nheads})"
            )

    def inference_queries(self) -> int:
        """Decoder queries run at inference (the most a caller can keep as top-K)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """The config of plain data (a preset's ``arch``, a preset file) through the typed config reader
        :func:`mfdetr.config.from_dict`: unknown keys and wrong types are one-line errors."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MfdetrError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        data = dict(d)
        if isinstance(data.get("backbone"), BackboneConfig):
            data["backbone"] = data["backbone"].to_dict()
        return from_dict(cls, data, where=cls.__name__)

    def level_strides(self) -> tuple[int, ...]:
        """Stride of every encoder level: the used backbone stages, then ×2 per extra level."""
        strides = [BACKBONE_STRIDES[i] for i in self.backbone.out_indices]
        while len(strides) < self.num_feature_levels:
            strides.append(strides[-1] * 2)
        return tuple(strides)

    def c1_channels(self) -> int:
        """Channels of backbone stage 0 (C1): ``embed_dim`` (Swin/FocalNet) or ``widths[0]`` (the tiny
        CNN, the demo ResNet) when the backbone params give them, else the kind's default (ResNet-50
        256; full-size Swin/FocalNet 192; tiny CNN 8)."""
        params, kind = self.backbone.params, self.backbone.kind
        if "embed_dim" in params:
            return int(params["embed_dim"])
        if "widths" in params:
            return int(params["widths"][0])
        if kind not in C1_CHANNELS:
            raise MfdetrError(f"backbone kind {kind!r}: give its C1 width as params.widths or params.embed_dim")
        return C1_CHANNELS[kind]


def family_preset(
    name: str,
    family: str,
    cfg: DetrArchConfig,
    *,
    checkpoint_file: str | None,
    box_ap: float | None,
    notes: str = "",
    preprocessing: Preprocessing | None = None,
) -> DetectorPreset:
    """The :class:`DetectorPreset` of ``cfg`` (COCO 91-slot identity map when ``num_classes == 91``;
    eval preprocessing 800/1333 with ImageNet mean/std unless given)."""
    return DetectorPreset(
        name=name,
        family=family,
        arch=cfg.to_dict(),
        checkpoint_file=checkpoint_file,
        checkpoint_sha256=None,
        box_ap=box_ap,
        num_classes=cfg.num_classes,
        class_to_category=coco91_identity() if cfg.num_classes == 91 else tuple(range(cfg.num_classes)),
        preprocessing=preprocessing or Preprocessing(short_side=800, max_size=1333),
        level_strides=cfg.level_strides(),
        hidden_dim=cfg.hidden_dim,
        c1_channels=cfg.c1_channels(),
        num_encoder_layers=cfg.enc_layers,
        num_queries=cfg.inference_queries(),
        notes=notes,
    )


CheckpointArg = str | Path | Mapping[str, Any] | None
FamilyBuild = Callable[..., FrozenDetector]


def register_family(
    presets: Mapping[str, DetectorPreset], configs: Mapping[str, DetrArchConfig], build: FamilyBuild
) -> None:
    """Register every preset with a builder ``build(cfg, preset=, checkpoint=, device=)``."""
    for name, preset in presets.items():
        cfg = configs[name]

        def builder(
            *,
            checkpoint: CheckpointArg = None,
            device: str = "cpu",
            _cfg: DetrArchConfig = cfg,
            _preset: DetectorPreset = preset,
        ) -> FrozenDetector:
            return build(_cfg, preset=_preset, checkpoint=checkpoint, device=device)

        builder.__name__ = f"build_{name}"
        register_detector(preset, builder)


__all__ = ["BACKBONE_STRIDES", "C1_CHANNELS", "DetrArchConfig", "family_preset", "register_family"]
