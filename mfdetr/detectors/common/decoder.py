"""Deformable decoder with iterative box refinement and per-layer head outputs (shared by families).

Deformable DETR's ``with_box_refine`` loop, as used by DINO and H-Deformable-DETR: every layer sees
its reference boxes scaled by the valid ratios of every level; after the layer the boxes are refined
with that layer's box head, ``ref ← sigmoid(bbox_embed[l](out) + logit(ref))``, and detached for the
next layer. The returned references are the **non-detached** refined boxes (H-DETR's
``look_forward_twice``; DINO returns the same values) — equal at inference.

Families differ only in the query positional embedding (a hook) and in the ``inverse_sigmoid`` eps
(DINO 1e-3, H-DETR 1e-5). Tensors are batch-first: queries [B, Q, d], memory [B, S, d].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.ops import inverse_sigmoid


class RefiningDecoder(nn.Module):
    """A stack of :class:`~mfdetr.detectors.common.deformable.DeformableDecoderLayer` (keys
    ``layers.{i}``) with box refinement through the detector's heads.

    ``bbox_embed`` / ``class_embed`` are the detector's per-layer heads; the detector attaches them
    (official aliasing: they appear under ``transformer.decoder.*`` too).

    Args:
        layers: the decoder layers.
        inv_sigmoid_eps: clamp of ``inverse_sigmoid`` in the refinement (family constant).
    """

    bbox_embed: nn.ModuleList
    class_embed: nn.ModuleList

    def __init__(self, *, layers: nn.ModuleList, inv_sigmoid_eps: float) -> None:
        super().__init__()
        self.layers = layers
        self.inv_sigmoid_eps = inv_sigmoid_eps

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_query_pos(self, ref_input: Tensor, lid: int) -> Tensor:
        """Hook: query positional embedding of layer ``lid`` from ``ref_input`` [B, Q, L, 4] (used
        when :meth:`forward` gets no fixed ``query_pos``; DINO recomputes it every layer)."""
        raise NotImplementedError(f"{type(self).__name__} needs a fixed query_pos")

    def forward(
        self,
        tgt: Tensor,
        reference: Tensor,
        memory: Tensor,
        levels: FlatLevels,
        *,
        query_pos: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decode.

        Args:
            tgt: [B, Q, d] content queries.
            reference: [B, Q, 4] initial boxes (sigmoid cxcywh of the unpadded image).
            memory: [B, S, d] encoder output; ``levels`` its geometry.
            query_pos: [B, Q, d] one positional embedding for every layer (H-DETR), or ``None`` to
                call :meth:`layer_query_pos` per layer.
            self_attn_mask: [Q, Q] bool self-attention mask of every layer (True = blocked), used by
                denoising training (:mod:`mfdetr.detectors.training.denoising`); ``None`` at inference.

        Returns:
            ``(outs, refs)``: ``outs[l]`` [B, Q, d] raw output of layer ``l``; ``refs[l]`` [B, Q, 4] the
            boxes **input** to layer ``l`` (``refs[0] = reference``) plus the last refined ones
            (``len(refs) = len(outs) + 1``).
        """
        ratios = torch.cat([levels.valid_ratios, levels.valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        out = tgt
        outs: list[Tensor] = []
        refs = [reference]
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios
            pos = query_pos if query_pos is not None else self.layer_query_pos(ref_input, lid)
            out = layer(
                out, pos, ref_input, memory, levels.level_hw(), levels.level_start_index, levels.mask, self_attn_mask
            )
            refined = (self.bbox_embed[lid](out) + inverse_sigmoid(reference, eps=self.inv_sigmoid_eps)).sigmoid()
            reference = refined.detach()
            outs.append(out)
            refs.append(refined)
        return outs, refs


def layer_predictions(
    hs: Sequence[Tensor], refs: Sequence[Tensor], *, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList, eps: float
) -> tuple[list[Tensor], list[Tensor]]:
    """Head outputs of every decoder layer (official ``DeformableDETR.forward`` / ``DINO.forward``).

    ``logits[l] = class_embed[l](hs[l])`` [B, Q, C];
    ``boxes[l] = sigmoid(bbox_embed[l](hs[l]) + inverse_sigmoid(refs[l], eps))`` [B, Q, 4], where
    ``refs[l]`` is the reference box that entered layer ``l``.
    """
    logits = [class_embed[lid](h) for lid, h in enumerate(hs)]
    boxes = [(bbox_embed[lid](h) + inverse_sigmoid(refs[lid], eps=eps)).sigmoid() for lid, h in enumerate(hs)]
    return logits, boxes


__all__ = ["RefiningDecoder", "layer_predictions"]
