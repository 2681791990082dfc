"""H-Deformable-DETR (Jia et al. 2023, hybrid matching) as a frozen detector, on the shared
:class:`~mfdetr.detectors.common.detr.DeformableDetr` skeleton.

Facts from HDETR/H-Deformable-DETR ``models/deformable_detr.py`` and ``models/position_encoding.py``:
map positions are ``PositionEmbeddingSine`` (temperature 10000, normalised, **−0.5 offset**); every
decoder layer has its own cloned heads ``class_embed.{0..dec_layers-1}`` / ``bbox_embed.*`` plus one
extra pair (index ``dec_layers``) for the encoder proposals; ``query_embed`` holds
``num_queries_one2one + num_queries_one2many`` content rows, of which inference uses the first
``num_queries_one2one`` (the one-to-many branch is training-only, so no self-attention mask is
needed). Parameter names equal the official ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones import Backbone, build_backbone
from mfdetr.detectors.common.checkpoint import CheckpointFormat
from mfdetr.detectors.common.decoder import RefiningDecoder
from mfdetr.detectors.common.detr import DeformableDetr
from mfdetr.detectors.common.layers import clones
from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.detectors.common.parts import build_decoder_layers, build_encoder, build_heads, build_level_proj
from mfdetr.layers import PositionEmbeddingSine
from mfdetr.detectors.hdetr.config import HDetrConfig
from mfdetr.detectors.hdetr.transformer import HDETR_INV_SIGMOID_EPS, HDetrTransformer

#: H-Deformable-DETR checkpoints: our names are the official ones. Dropped, explicitly: BN
#: ``num_batches_tracked`` of the ResNet body, and the ``total_ops`` / ``total_params`` buffers that
#: FLOP counting (thop) leaves on modules — the official ``--resume`` ignores exactly those.
HDETR_CHECKPOINT_FORMAT = CheckpointFormat(
    name="HDETR/H-Deformable-DETR",
    renames=((r"^backbone\.0\.body\..*\.num_batches_tracked$", None), (r"(^|\.)total_(ops|params)$", None)),
)
#: Swin backbones sit in ``TransformerBackbone.body`` officially (``backbone.0.body.layers...``); our
#: Swin module is the backbone itself (``backbone.0.layers...``, as in DINO).
HDETR_SWIN_CHECKPOINT_FORMAT = CheckpointFormat(
    name="HDETR/H-Deformable-DETR (Swin)",
    renames=(*HDETR_CHECKPOINT_FORMAT.renames, (r"^backbone\.0\.body\.", "backbone.0.")),
)


def hdetr_checkpoint_format(cfg: HDetrConfig) -> CheckpointFormat:
    """The official key layout for ``cfg``'s backbone kind."""
    return HDETR_SWIN_CHECKPOINT_FORMAT if cfg.backbone.kind == "swin" else HDETR_CHECKPOINT_FORMAT


class HDetrDetector(DeformableDetr):
    """H-Deformable-DETR with the official module layout.

    Args:
        backbone, transformer, input_proj, position, class_embed, bbox_embed, preset, num_select: as
            :class:`DeformableDetr` (``class_embed`` / ``bbox_embed`` have ``dec_layers + 1`` entries).
        query_embed: content queries, ``num_queries_one2one + num_queries_one2many`` rows.
        num_queries_one2one: rows used at inference.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: HDetrTransformer,
        input_proj: nn.ModuleList,
        position: PositionEmbeddingSine,
        class_embed: nn.ModuleList,
        bbox_embed: nn.ModuleList,
        query_embed: nn.Embedding,
        num_queries_one2one: int,
        preset: DetectorPreset,
        num_select: int = 100,
        inv_sigmoid_eps: float = HDETR_INV_SIGMOID_EPS,
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
            inv_sigmoid_eps=inv_sigmoid_eps,
        )
        if transformer.num_queries != num_queries_one2one or query_embed.num_embeddings < num_queries_one2one:
            raise ValueError(
                f"query_embed ({query_embed.num_embeddings} rows) / transformer "
                f"({transformer.num_queries}) do not fit num_queries_one2one={num_queries_one2one}"
            )
        self.query_embed = query_embed
        self.num_queries_one2one = num_queries_one2one

    def run_transformer(
        self, levels: FlatLevels, *, keep: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor], Tensor, dict[int, Tensor]]:
        """Mixed selection: the one-to-one rows of ``query_embed`` are the content queries."""
        return self.transformer(levels, keep=keep, content=self.query_embed.weight[: self.num_queries_one2one])


def build_hdetr_model(cfg: HDetrConfig, *, preset: DetectorPreset) -> HDetrDetector:
    """Build an (unfrozen, randomly initialised) H-DETR from ``cfg``; every size comes from ``cfg``."""
    backbone = build_backbone(cfg.backbone)
    decoder = RefiningDecoder(layers=build_decoder_layers(cfg), inv_sigmoid_eps=cfg.inv_sigmoid_eps)
    transformer = HDetrTransformer(
        encoder=build_encoder(cfg),
        decoder=decoder,
        d_model=cfg.hidden_dim,
        num_queries=cfg.num_queries_one2one,
        num_levels=cfg.num_feature_levels,
    )
    class_head, box_head = build_heads(cfg)
    n_heads = cfg.dec_layers + 1  # one cloned pair per decoder layer + the encoder-proposal pair
    return HDetrDetector(
        backbone=backbone,
        transformer=transformer,
        input_proj=build_level_proj(backbone, cfg),
        position=PositionEmbeddingSine(
            num_feats=cfg.hidden_dim // 2, temperature_h=10000.0, temperature_w=10000.0, normalize=True, offset=-0.5
        ),
        class_embed=clones(class_head, n_heads),
        bbox_embed=clones(box_head, n_heads),
        query_embed=nn.Embedding(cfg.num_queries_one2one + cfg.num_queries_one2many, cfg.hidden_dim),
        num_queries_one2one=cfg.num_queries_one2one,
        preset=preset,
        num_select=cfg.num_select,
        inv_sigmoid_eps=cfg.inv_sigmoid_eps,
    )


__all__ = [
    "HDETR_CHECKPOINT_FORMAT",
    "HDETR_SWIN_CHECKPOINT_FORMAT",
    "HDetrDetector",
    "build_hdetr_model",
    "hdetr_checkpoint_format",
]
