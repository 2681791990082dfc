"""Deformable transformer stacks shared by DINO and H-Deformable-DETR (official module names).

Both families use the same post-norm layers (``dropout = 0`` at inference, so no dropout modules):

- encoder layer (:class:`mfdetr.layers.DeformableEncoderLayer` with ReLU and the official keys
  ``linear1`` / ``linear2``, built by :func:`official_encoder_layer`):
  ``src = norm1(src + self_attn(src + pos, ref, src))``, then ``src = norm2(src + linear2(relu(linear1(src))))``;
- decoder layer, order sa → ca → ffn: ``tgt = norm2(tgt + self_attn(q=k=tgt+pos, v=tgt))``,
  ``tgt = norm1(tgt + cross_attn(tgt + pos, ref, memory))``, ``tgt = norm3(tgt + ffn(tgt))``.

All tensors are batch-first: tokens [B, S, d], queries [B, Q, d].
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.layers import DeformableEncoderLayer, encoder_reference_points
from mfdetr.ops import MSDeformAttn, SpatialShapes


def valid_ratios(mask: Tensor) -> Tensor:
    """``mask`` [B, H, W] True at padding → [B, 2] valid fraction (w, h) of the map."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / w, valid_h / h], -1)


def official_encoder_layer(
    *, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int
) -> DeformableEncoderLayer:
    """The detectors' encoder layer: post-norm, ReLU FFN under the official keys ``linear1`` / ``linear2``."""
    return DeformableEncoderLayer(
        dim=d_model,
        levels=n_levels,
        heads=n_heads,
        points=n_points,
        ffn_hidden=d_ffn,
        activation="relu",
        ffn_names="linear",
    )


class DeformableEncoder(nn.Module):
    """A stack of encoder layers (keys ``layers.{i}``), no final norm; can return inner outputs."""

    def __init__(self, *, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: Tensor,
        ratios: Tensor,
        padding_mask: Tensor,
        *,
        keep: Collection[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run all layers.

        Args:
            src, pos: [B, S, d] flattened tokens and their positional (+ level) embeddings.
            ratios: [B, L, 2] valid ratios; padding_mask [B, S] True at padding.
            keep: 1-based layer indices whose outputs to return (paper Table 15: layer 4 of 6).

        Returns:
            ``(memory [B, S, d], {layer: [B, S, d]})``.
        """
        ref = encoder_reference_points(spatial_shapes, ratios)
        kept: dict[int, Tensor] = {}
        out = src
        for i, layer in enumerate(self.layers, start=1):
            out = layer(out, pos, ref, spatial_shapes, padding_mask, level_start_index=level_start_index)
            if i in keep:
                kept[i] = out
        return out, kept


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention → deformable cross-attention → ReLU FFN."""

    def __init__(self, *, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: Tensor,
        memory_padding_mask: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """tgt, query_pos [B, Q, d]; reference_points [B, Q, L, 4] (valid-ratio scaled); memory [B, S, d];
        ``self_attn_mask`` [Q, Q] bool, True where query i must not attend to query j (training with
        denoising queries; ``None`` at inference)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, attn_mask=self_attn_mask, need_weights=False)[0])
        tgt = self.norm1(
            tgt
            + self.cross_attn(
                tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
            )
        )
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
