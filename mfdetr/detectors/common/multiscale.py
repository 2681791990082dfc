"""Multi-scale encoder inputs: input projections, level masks, positional encodings, flattening.

Shared by DINO and H-Deformable-DETR (official ``input_proj`` layout): every returned backbone level
goes through ``Conv2d 1x1 → GroupNorm(32)``; extra levels are ``Conv2d 3x3 stride 2 → GroupNorm(32)``,
the first on the **raw** last backbone map, later ones on the previous extra level. Level masks are
the image padding mask resized with ``F.interpolate`` (nearest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.common.deformable import valid_ratios
from mfdetr.layers import PositionEmbeddingSine
from mfdetr.ops import level_shapes, shapes_tensor


def build_input_proj(*, in_channels: Sequence[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
    """``input_proj.{i}.{0: conv, 1: GroupNorm(32)}`` for ``len(in_channels)`` backbone levels + extras."""
    if num_levels < len(in_channels):
        raise ValueError(f"{num_levels} levels but the backbone returns {len(in_channels)} maps")
    projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels]
    c = in_channels[-1]
    for _ in range(num_levels - len(in_channels)):
        projs.append(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim))
        )
        c = hidden_dim
    for p in projs:
        nn.init.xavier_uniform_(p[0].weight, gain=1)
        nn.init.constant_(p[0].bias, 0)
    return nn.ModuleList(projs)


def resize_mask(pad_mask: Tensor, size: Sequence[int]) -> Tensor:
    """[B, H, W] bool → [B, h, w] bool by nearest interpolation (the official level masks)."""
    return F.interpolate(pad_mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def project_levels(
    input_proj: nn.ModuleList, feats: Sequence[Tensor], pad_mask: Tensor, position: PositionEmbeddingSine | None = None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Project backbone maps to ``d`` and add the extra levels.

    Args:
        feats: backbone maps of the used stages, highest resolution first.
        pad_mask: [B, H, W] image padding mask (True at padding).

    Returns:
        ``(srcs, masks, poss)`` per level: [B, d, H_l, W_l], [B, H_l, W_l] bool, [B, d, H_l, W_l]
        (``poss`` empty when ``position`` is None).

    Note (official semantics): the GroupNorm statistics include the padded area, so an image padded
    inside a batch does not give exactly the features it gives alone.
    """
    srcs, masks, poss = [], [], []
    for lvl, proj in enumerate(input_proj):
        if lvl < len(feats):
            src = proj(feats[lvl])
        else:
            src = proj(feats[-1] if lvl == len(feats) else srcs[-1])
        mask = resize_mask(pad_mask, src.shape[-2:])
        srcs.append(src)
        masks.append(mask)
        if position is not None:
            poss.append(position(mask).to(src.dtype))
    return srcs, masks, poss


@dataclass
class FlatLevels:
    """All levels flattened (row-major per level) and concatenated along the token axis.

    - ``src``, ``pos`` [B, S, d] (``pos`` includes the level embedding);
    - ``mask`` [B, S] True at padding; ``spatial_shapes`` [L, 2] (H_l, W_l) int64;
    - ``level_start_index`` [L]; ``valid_ratios`` [B, L, 2] (w, h);
    - ``shapes`` the (H_l, W_l) pairs of ``spatial_shapes`` as sizes (symbolic under ``torch.export``,
      where a tensor's values are not known); empty: read from ``spatial_shapes``.
    """

    src: Tensor
    pos: Tensor
    mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    shapes: list[tuple[int, int]] = field(default_factory=list)

    def level_hw(self) -> list[tuple[int, int]]:
        """(H_l, W_l) per level (``shapes``, else read from ``spatial_shapes``)."""
        return list(self.shapes) if self.shapes else level_shapes(self.spatial_shapes)

    def unflatten(self, tokens: Tensor) -> list[Tensor]:
        """[B, S, d] → per level [B, d, H_l, W_l]."""
        bsz, _, d = tokens.shape
        shapes = self.level_hw()
        parts = tokens.split([h * w for h, w in shapes], dim=1)
        return [p.transpose(1, 2).reshape(bsz, d, h, w) for p, (h, w) in zip(parts, shapes, strict=True)]


def flatten_levels(
    srcs: Sequence[Tensor], masks: Sequence[Tensor], poss: Sequence[Tensor], level_embed: Tensor
) -> FlatLevels:
    """Flatten per-level maps; ``level_embed`` [L, d] is added to each level's positions."""
    pairs = [(s.shape[-2], s.shape[-1]) for s in srcs]
    shapes = shapes_tensor(pairs, srcs[0].device)
    start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    return FlatLevels(
        src=torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
        pos=torch.cat(
            [p.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(poss)], 1
        ),
        mask=torch.cat([m.flatten(1) for m in masks], 1),
        spatial_shapes=shapes,
        level_start_index=start,
        shapes=pairs,
        valid_ratios=torch.stack([valid_ratios(m) for m in masks], 1),
    )
