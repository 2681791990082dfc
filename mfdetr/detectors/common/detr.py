"""The multi-scale deformable DETR skeleton shared by the families (official module layout).

``backbone.0`` (the official ``Joiner`` slot) → ``input_proj`` (+ extra levels) → map sine encodings
from the level masks + ``transformer.level_embed`` → the family's ``transformer`` (encoder, two-stage
selection, :class:`~mfdetr.detectors.common.decoder.RefiningDecoder`) → per-layer heads
``class_embed.{l}`` / ``bbox_embed.{l}`` (aliased as ``transformer.decoder.{class,bbox}_embed``).

A family subclasses :class:`DeformableDetr`, passes its transformer and constants, and overrides
:meth:`DeformableDetr.run_transformer` only if its transformer needs detector-level inputs (H-DETR's
``query_embed``). The transformer contract: ``transformer(levels, keep=...) -> (hs, refs, memory,
kept)`` with ``hs[l]`` [B, Q, d] the head inputs of layer ``l``, ``refs`` as
:meth:`RefiningDecoder.forward`, ``memory`` [B, S, d] and ``kept`` {1-based encoder layer: [B, S, d]}.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones.base import Backbone
from mfdetr.detectors.common.decoder import layer_predictions
from mfdetr.detectors.common.frozen import DetrForward, FrozenDetr
from mfdetr.detectors.common.multiscale import FlatLevels, flatten_levels, project_levels
from mfdetr.layers import PositionEmbeddingSine


class DeformableDetr(FrozenDetr):
    """Backbone + input projections + family transformer + per-layer heads.

    Args:
        backbone: stored as ``backbone.0``.
        transformer: has ``level_embed`` [L, d], ``encoder.num_layers`` and ``decoder`` (the heads are
            attached to it).
        input_proj: per-level projections (``build_input_proj``).
        position: map positional encoding (family temperature / offset).
        class_embed, bbox_embed: per-decoder-layer heads (entries may repeat one shared module;
            H-DETR has one more for the encoder proposals).
        preset: preset metadata; num_select: post-processing top-k.
        inv_sigmoid_eps: ``inverse_sigmoid`` clamp of the box heads (DINO 1e-3, H-DETR 1e-5).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        transformer: nn.Module,
        input_proj: nn.ModuleList,
        position: PositionEmbeddingSine,
        class_embed: nn.ModuleList,
        bbox_embed: nn.ModuleList,
        preset: DetectorPreset,
        num_select: int,
        inv_sigmoid_eps: float,
    ) -> None:
        super().__init__()
        self.backbone = nn.ModuleList([backbone])
        self.transformer = transformer
        self.input_proj = input_proj
        self.position = position
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        # official aliasing: the decoder refines boxes (and H-DETR selects proposals) with these heads
        self.transformer.decoder.class_embed = class_embed
        self.transformer.decoder.bbox_embed = bbox_embed
        self.preset = preset
        self.num_select = num_select
        self.inv_sigmoid_eps = inv_sigmoid_eps
        self.num_encoder_layers = transformer.encoder.num_layers

    @property
    def body(self) -> Backbone:
        return self.backbone[0]  # type: ignore[return-value]

    def forward_detr(self, images: Tensor, pad_mask: Tensor, *, enc_layers: Sequence[int] = ()) -> DetrForward:
        """Full forward (see :class:`~mfdetr.detectors.common.frozen.DetrForward`).

        ``aux`` holds ``hs`` (head inputs of every decoder layer), ``refs`` (reference boxes: the input
        of each layer, then the last refined one), ``memory`` (last encoder layer), and
        ``layer_logits`` / ``layer_boxes`` (head outputs of every layer).
        """
        feats = self.body(images)
        used = [feats[i] for i in self.body.out_indices]
        srcs, masks, _ = project_levels(self.input_proj, used, pad_mask)
        return self.forward_levels(srcs, masks, c1=feats[0], enc_layers=enc_layers)

    def run_transformer(
        self, levels: FlatLevels, *, keep: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor], Tensor, dict[int, Tensor]]:
        """Hook: the family transformer on flattened levels (see the module docstring)."""
        return self.transformer(levels, keep=keep)

    def forward_levels(
        self, srcs: Sequence[Tensor], masks: Sequence[Tensor], *, c1: Tensor, enc_layers: Sequence[int] = ()
    ) -> DetrForward:
        """The transformer and heads on projected levels ``srcs`` [B, d, H_l, W_l] with their padding
        masks [B, H_l, W_l] (positional encodings are computed from the masks)."""
        poss = [self.position(m).to(s.dtype) for s, m in zip(srcs, masks, strict=True)]
        levels = flatten_levels(srcs, masks, poss, self.transformer.level_embed)
        hs, refs, memory, kept = self.run_transformer(levels, keep=enc_layers)
        logits, boxes = layer_predictions(
            hs, refs, class_embed=self.class_embed, bbox_embed=self.bbox_embed, eps=self.inv_sigmoid_eps
        )
        return DetrForward(
            logits=logits[-1],
            boxes=boxes[-1],
            hs=hs[-1],
            enc_memory=kept,
            levels=levels,
            level_masks=list(masks),
            c1=c1,
            aux={"hs": hs, "refs": refs, "memory": memory, "layer_logits": logits, "layer_boxes": boxes},
        )


__all__ = ["DeformableDetr"]
