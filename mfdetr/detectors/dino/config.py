"""Typed architecture config of DINO (any size; presets are instances of it)."""

from __future__ import annotations

from dataclasses import dataclass

from mfdetr.detectors.common.arch import DetrArchConfig


@dataclass(frozen=True)
class DinoConfig(DetrArchConfig):
    """DINO architecture (IDEA-Research/DINO, ``two_stage_type='standard'``, inference semantics).

    Inherits the shared sizes of :class:`~mfdetr.detectors.common.arch.DetrArchConfig` (backbone,
    ``hidden_dim``, ``nheads``, encoder/decoder layers, FFN, points, levels, classes) and adds:

    Args:
        num_queries: decoder queries (= two-stage proposals kept; official 900).
        dn_labelbook_size: denoising label book; ``label_enc`` has ``+1`` rows (training only, but
            its weights are in released checkpoints; official 91 → 92 rows).
        pe_temperature_h, pe_temperature_w: map positional-encoding temperatures (DINO: 20, 20; detrex's
            DINO: 10000, 10000).
        pe_offset: added to the cumulative map position before normalising (DINO: 0; detrex: −0.5).
        dec_pred_class_embed_share, dec_pred_bbox_embed_share: one head shared by all decoder layers.
        num_select: post-processing top-k over queries × classes (DINO: 300).
    """

    num_queries: int = 900
    dn_labelbook_size: int = 91
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    pe_offset: float = 0.0
    dec_pred_class_embed_share: bool = True
    dec_pred_bbox_embed_share: bool = True
    num_select: int = 300

    def inference_queries(self) -> int:
        return self.num_queries
