"""Typed architecture config of DINO (any size; presets are instances of it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mfdetr.detectors.backbones.factory import BackboneConfig
from mfdetr.errors import MfdetrError


@dataclass(frozen=True)
class DinoConfig:
    """DINO architecture (IDEA-Research/DINO, ``two_stage_type='standard'``, inference semantics).

    Args:
        backbone: which backbone and which stages feed the encoder (``out_indices``).
        hidden_dim: transformer width ``d`` (official 256; GroupNorm(32) needs ``d % 32 == 0``).
        nheads: attention heads (self-attention and deformable attention).
        enc_layers, dec_layers: encoder / decoder depth.
        dim_feedforward: FFN width.
        enc_n_points, dec_n_points: deformable sampling points per head and level.
        num_queries: decoder queries (= two-stage proposals kept).
        num_feature_levels: encoder levels; levels beyond the backbone's are stride-2 convs.
        num_classes: classification slots (91 for official COCO models).
        dn_labelbook_size: denoising label book; ``label_enc`` has ``+1`` rows (training only, but
            its weights are in released checkpoints).
        pe_temperature_h, pe_temperature_w: map positional-encoding temperatures (DINO: 20, 20).
        dec_pred_class_embed_share, dec_pred_bbox_embed_share: one head shared by all decoder layers.
        num_select: post-processing top-k over queries × classes (DINO: 300).
    """

    backbone: BackboneConfig
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    num_feature_levels: int = 4
    num_classes: int = 91
    dn_labelbook_size: int = 91
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    dec_pred_class_embed_share: bool = True
    dec_pred_bbox_embed_share: bool = True
    num_select: int = 300

    def __post_init__(self) -> None:
        n_backbone = len(self.backbone.out_indices)
        if self.num_feature_levels < n_backbone:
            raise MfdetrError(f"num_feature_levels ({self.num_feature_levels}) < backbone levels ({n_backbone})")
        if self.hidden_dim % 32 or self.hidden_dim % self.nheads or self.hidden_dim % 2:
            raise MfdetrError(f"hidden_dim ({self.hidden_dim}) must be a multiple of 32 (GroupNorm) and of "
                              f"nheads ({self.nheads})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DinoConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MfdetrError(f"unknown DINO config keys: {sorted(unknown)}")
        kw = dict(d)
        bb = kw.pop("backbone")
        return cls(backbone=bb if isinstance(bb, BackboneConfig) else BackboneConfig.from_dict(bb), **kw)
