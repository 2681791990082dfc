"""Builders of the parts every deformable DETR family sizes from its :class:`DetrArchConfig`.

Used by the family builders (``build_<family>_model``) so that each one only wires its own modules:
the encoder and decoder layer stacks, the input projections of the backbone's levels, and the
official head initialisation (class bias for prior probability 0.01, zeroed last box layer).
"""

from __future__ import annotations

import math

from torch import nn

from mfdetr.detectors.backbones.base import Backbone
from mfdetr.detectors.common.arch import DetrArchConfig
from mfdetr.detectors.common.deformable import DeformableDecoderLayer, DeformableEncoder, official_encoder_layer
from mfdetr.detectors.common.layers import MLP
from mfdetr.detectors.common.multiscale import build_input_proj


def build_encoder(cfg: DetrArchConfig) -> DeformableEncoder:
    """``cfg.enc_layers`` post-norm deformable encoder layers (keys ``layers.{i}``)."""
    return DeformableEncoder(
        layers=nn.ModuleList(
            official_encoder_layer(
                d_model=cfg.hidden_dim,
                d_ffn=cfg.dim_feedforward,
                n_levels=cfg.num_feature_levels,
                n_heads=cfg.nheads,
                n_points=cfg.enc_n_points,
            )
            for _ in range(cfg.enc_layers)
        )
    )


def build_decoder_layers(cfg: DetrArchConfig) -> nn.ModuleList:
    """``cfg.dec_layers`` post-norm decoder layers (sa → ca → ffn)."""
    return nn.ModuleList(
        DeformableDecoderLayer(
            d_model=cfg.hidden_dim,
            d_ffn=cfg.dim_feedforward,
            n_levels=cfg.num_feature_levels,
            n_heads=cfg.nheads,
            n_points=cfg.dec_n_points,
        )
        for _ in range(cfg.dec_layers)
    )


def build_level_proj(backbone: Backbone, cfg: DetrArchConfig) -> nn.ModuleList:
    """``input_proj`` for the backbone's returned stages plus the extra stride-2 levels."""
    return build_input_proj(
        in_channels=[s.channels for s in backbone.out_specs],
        hidden_dim=cfg.hidden_dim,
        num_levels=cfg.num_feature_levels,
    )


def build_heads(cfg: DetrArchConfig) -> tuple[nn.Linear, MLP]:
    """One class head (bias ``-log((1 - 0.01) / 0.01)``, prior probability 0.01) and one 3-layer box
    head with a zeroed last layer — the official initialisation; families clone or share them."""
    class_head = nn.Linear(cfg.hidden_dim, cfg.num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(input_dim=cfg.hidden_dim, hidden_dim=cfg.hidden_dim, output_dim=4, num_layers=3)
    nn.init.constant_(box_head.layers[-1].weight, 0.0)
    nn.init.constant_(box_head.layers[-1].bias, 0.0)
    return class_head, box_head


__all__ = ["build_decoder_layers", "build_encoder", "build_heads", "build_level_proj"]
