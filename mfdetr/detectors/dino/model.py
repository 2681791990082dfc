"""DINO (Zhang et al. 2022) as a frozen detector: backbone → input projections → deformable encoder →
two-stage query selection → decoder with iterative box refinement → shared heads.

Facts from IDEA-Research/DINO ``models/dino/dino.py`` (inference path; denoising is training-only,
but ``label_enc`` exists so released checkpoints load strictly). Parameter names equal the official
ones (``backbone.0``, ``input_proj``, ``transformer``, ``class_embed``/``bbox_embed`` shared by all
decoder layers and aliased as ``transformer.decoder.{class,bbox}_embed``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones import Backbone, build_backbone
from mfdetr.detectors.common.checkpoint import CheckpointFormat
from mfdetr.detectors.common.deformable import DeformableDecoderLayer, DeformableEncoder, DeformableEncoderLayer
from mfdetr.detectors.common.frozen import DetrForward, FrozenDetr
from mfdetr.detectors.common.layers import MLP, clones
from mfdetr.detectors.common.multiscale import build_input_proj, flatten_levels, project_levels
from mfdetr.detectors.common.position import PositionEmbeddingSine
from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.transformer import DINO_INV_SIGMOID_EPS, DinoDecoder, DinoTransformer
from mfdetr.ops import inverse_sigmoid

#: IDEA-Research/DINO and FocalNet-DINO checkpoints: our names are the official ones; only BN
#: ``num_batches_tracked`` entries (absent from frozen-BN models, present if a body was saved from
#: a plain torchvision model) are dropped.
DINO_CHECKPOINT_FORMAT = CheckpointFormat(
    name="IDEA-Research/DINO",
    renames=((r"^backbone\.0\.body\..*\.num_batches_tracked$", None),),
)


class DinoDetector(FrozenDetr):
    """DINO with the official module layout.

    Args:
        backbone: the backbone (stored as ``backbone.0``, the official ``Joiner`` slot).
        transformer: encoder, two-stage selection and decoder.
        input_proj: per-level projections (``build_input_proj``).
        position: map positional encoding (DINO: temperature 20/20, normalised, no offset).
        class_embed, bbox_embed: per-decoder-layer heads (the same module repeated when shared).
        label_enc: denoising label embedding (training only; kept for strict loading).
        preset: the preset metadata; num_select: post-processing top-k.
    """

    def __init__(self, *, backbone: Backbone, transformer: DinoTransformer, input_proj: nn.ModuleList,
                 position: PositionEmbeddingSine, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList,
                 label_enc: nn.Embedding, preset: DetectorPreset, num_select: int = 300) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([backbone])
        self.transformer = transformer
        self.input_proj = input_proj
        self.position = position
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        # official aliasing: the decoder refines boxes with the detector's heads
        self.transformer.decoder.class_embed = class_embed
        self.transformer.decoder.bbox_embed = bbox_embed
        self.label_enc = label_enc
        self.preset = preset
        self.num_select = num_select
        self.num_encoder_layers = transformer.encoder.num_layers

    @property
    def body(self) -> Backbone:
        return self.backbone[0]  # type: ignore[return-value]

    def forward_detr(self, images: Tensor, pad_mask: Tensor, *, enc_layers: Sequence[int] = ()) -> DetrForward:
        """Full DINO forward (see :class:`~mfdetr.detectors.common.frozen.DetrForward`).

        ``aux`` holds ``hs`` (normed outputs of every decoder layer), ``refs`` (reference boxes, the
        input of each layer then the last refined one), ``memory`` (last encoder layer), and
        ``layer_logits`` / ``layer_boxes`` (head outputs of every layer).
        """
        feats = self.body(images)
        used = [feats[i] for i in self.body.out_indices]
        srcs, masks, _ = project_levels(self.input_proj, used, pad_mask)
        return self.forward_levels(srcs, masks, c1=feats[0], enc_layers=enc_layers)

    def forward_levels(self, srcs: Sequence[Tensor], masks: Sequence[Tensor], *, c1: Tensor,
                       enc_layers: Sequence[int] = ()) -> DetrForward:
        """The transformer and heads on projected levels ``srcs`` [B, d, H_l, W_l] with their padding
        masks [B, H_l, W_l] (positional encodings are computed from the masks)."""
        poss = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks, strict=True)]
        levels = flatten_levels(srcs, masks, poss, self.transformer.level_embed)
        hs, refs, memory, kept = self.transformer(levels, keep=enc_layers)
        layer_boxes = [(self.bbox_embed[lid](h) + inverse_sigmoid(refs[lid], eps=DINO_INV_SIGMOID_EPS)).sigmoid()
                       for lid, h in enumerate(hs)]
        layer_logits = [self.class_embed[lid](h) for lid, h in enumerate(hs)]
        return DetrForward(logits=layer_logits[-1], boxes=layer_boxes[-1], hs=hs[-1], enc_memory=kept,
                           levels=levels, level_masks=list(masks), c1=c1,
                           aux={"hs": hs, "refs": refs, "memory": memory, "layer_logits": layer_logits,
                                "layer_boxes": layer_boxes})


def build_dino_model(cfg: DinoConfig, *, preset: DetectorPreset) -> DinoDetector:
    """Build an (unfrozen, randomly initialised) DINO from ``cfg``; every size comes from ``cfg``."""
    d = cfg.hidden_dim
    backbone = build_backbone(cfg.backbone)
    enc_layers = nn.ModuleList(
        DeformableEncoderLayer(d_model=d, d_ffn=cfg.dim_feedforward, n_levels=cfg.num_feature_levels,
                               n_heads=cfg.nheads, n_points=cfg.enc_n_points) for _ in range(cfg.enc_layers))
    dec_layers = nn.ModuleList(
        DeformableDecoderLayer(d_model=d, d_ffn=cfg.dim_feedforward, n_levels=cfg.num_feature_levels,
                               n_heads=cfg.nheads, n_points=cfg.dec_n_points) for _ in range(cfg.dec_layers))
    transformer = DinoTransformer(encoder=DeformableEncoder(layers=enc_layers),
                                  decoder=DinoDecoder(layers=dec_layers, d_model=d), d_model=d,
                                  num_queries=cfg.num_queries, num_levels=cfg.num_feature_levels,
                                  num_classes=cfg.num_classes)
    class_head = nn.Linear(d, cfg.num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior prob 0.01
    box_head = MLP(input_dim=d, hidden_dim=d, output_dim=4, num_layers=3)
    nn.init.constant_(box_head.layers[-1].weight, 0.0)
    nn.init.constant_(box_head.layers[-1].bias, 0.0)
    return DinoDetector(
        backbone=backbone, transformer=transformer,
        input_proj=build_input_proj(in_channels=[s.channels for s in backbone.out_specs], hidden_dim=d,
                                    num_levels=cfg.num_feature_levels),
        position=PositionEmbeddingSine(num_feats=d // 2, temperature_h=cfg.pe_temperature_h,
                                       temperature_w=cfg.pe_temperature_w, normalize=True, offset=0.0),
        class_embed=clones(class_head, cfg.dec_layers, shared=cfg.dec_pred_class_embed_share),
        bbox_embed=clones(box_head, cfg.dec_layers, shared=cfg.dec_pred_bbox_embed_share),
        label_enc=nn.Embedding(cfg.dn_labelbook_size + 1, d), preset=preset, num_select=cfg.num_select)


def level_strides(cfg: DinoConfig, backbone_strides: Sequence[int] = (4, 8, 16, 32)) -> tuple[int, ...]:
    """Stride of every encoder level: the used backbone stages, then ×2 per extra level."""
    strides = [backbone_strides[i] for i in cfg.backbone.out_indices]
    while len(strides) < cfg.num_feature_levels:
        strides.append(strides[-1] * 2)
    return tuple(strides)


__all__ = ["DINO_CHECKPOINT_FORMAT", "DinoDetector", "build_dino_model", "level_strides"]
