"""DINO (Zhang et al. 2022) as a frozen detector: backbone → input projections → deformable encoder →
two-stage query selection → decoder with iterative box refinement → shared heads.

Facts from IDEA-Research/DINO ``models/dino/dino.py`` (inference path; denoising is training-only,
but ``label_enc`` exists so released checkpoints load strictly). Parameter names equal the official
ones (``backbone.0``, ``input_proj``, ``transformer``, ``class_embed``/``bbox_embed`` shared by all
decoder layers and aliased as ``transformer.decoder.{class,bbox}_embed``). Runs on the shared
:class:`~mfdetr.detectors.common.detr.DeformableDetr` skeleton.
"""

from __future__ import annotations

from torch import nn

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones import Backbone, build_backbone
from mfdetr.detectors.common.checkpoint import CheckpointFormat
from mfdetr.detectors.common.detr import DeformableDetr
from mfdetr.detectors.common.layers import clones
from mfdetr.detectors.common.parts import build_decoder_layers, build_encoder, build_heads, build_level_proj
from mfdetr.layers import PositionEmbeddingSine
from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.transformer import DINO_INV_SIGMOID_EPS, DinoDecoder, DinoTransformer

#: IDEA-Research/DINO and FocalNet-DINO checkpoints: our names are the official ones; only BN
#: ``num_batches_tracked`` entries (absent from frozen-BN models, present if a body was saved from
#: a plain torchvision model) are dropped.
DINO_CHECKPOINT_FORMAT = CheckpointFormat(
    name="IDEA-Research/DINO",
    renames=((r"^backbone\.0\.body\..*\.num_batches_tracked$", None),),
)


class DinoDetector(DeformableDetr):
    """DINO with the official module layout (``DeformableDetr`` + the denoising ``label_enc``).

    Args:
        backbone: the backbone (stored as ``backbone.0``, the official ``Joiner`` slot).
        transformer: encoder, two-stage selection and decoder.
        input_proj: per-level projections (``build_input_proj``).
        position: map positional encoding (DINO: temperature 20/20, normalised, no offset).
        class_embed, bbox_embed: per-decoder-layer heads (the same module repeated when shared).
        label_enc: denoising label embedding (training only; kept for strict loading).
        preset: the preset metadata; num_select: post-processing top-k.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: DinoTransformer,
        input_proj: nn.ModuleList,
        position: PositionEmbeddingSine,
        class_embed: nn.ModuleList,
        bbox_embed: nn.ModuleList,
        label_enc: nn.Embedding,
        preset: DetectorPreset,
        num_select: int = 300,
    ) -> None:
        super().__init__(
            backbone=backbone,
            transformer=transformer,
            input_proj=input_proj,
            position=position,
            class_embed=class_embed,
            bbox_embed=bbox_embed,
            preset=preset,
            num_select=num_select,
            inv_sigmoid_eps=DINO_INV_SIGMOID_EPS,
        )
        self.label_enc = label_enc


def build_dino_model(cfg: DinoConfig, *, preset: DetectorPreset) -> DinoDetector:
    """Build an (unfrozen, randomly initialised) DINO from ``cfg``; every size comes from ``cfg``."""
    backbone = build_backbone(cfg.backbone)
    transformer = DinoTransformer(
        encoder=build_encoder(cfg),
        decoder=DinoDecoder(layers=build_decoder_layers(cfg), d_model=cfg.hidden_dim),
        d_model=cfg.hidden_dim,
        num_queries=cfg.num_queries,
        num_levels=cfg.num_feature_levels,
        num_classes=cfg.num_classes,
    )
    class_head, box_head = build_heads(cfg)
    return DinoDetector(
        backbone=backbone,
        transformer=transformer,
        input_proj=build_level_proj(backbone, cfg),
        position=PositionEmbeddingSine(
            num_feats=cfg.hidden_dim // 2,
            temperature_h=cfg.pe_temperature_h,
            temperature_w=cfg.pe_temperature_w,
            normalize=True,
            offset=cfg.pe_offset,
        ),
        class_embed=clones(class_head, cfg.dec_layers, shared=cfg.dec_pred_class_embed_share),
        bbox_embed=clones(box_head, cfg.dec_layers, shared=cfg.dec_pred_bbox_embed_share),
        label_enc=nn.Embedding(cfg.dn_labelbook_size + 1, cfg.hidden_dim),
        preset=preset,
        num_select=cfg.num_select,
    )


__all__ = ["DINO_CHECKPOINT_FORMAT", "DinoDetector", "build_dino_model"]
