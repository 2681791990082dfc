"""Sine positional encodings of DETR-family models (feature maps, valid sizes, query boxes).

All follow the DETR convention (:func:`sine_features`): for a coordinate ``t`` and ``F`` features,
frequency index ``j`` uses ``T^(2·floor(j/2)/F)``; even features are ``sin``, odd ones ``cos``
(interleaved). Map encodings put ``[pos_y, pos_x]`` in this channel order.

- Padded maps from a padding mask (:class:`PositionEmbeddingSine`): DINO's ``PositionEmbeddingSineHW``
  is temperature 20/20, normalised, no offset; H-Deformable-DETR's ``PositionEmbeddingSine`` is
  temperature 10000 with a −0.5 offset.
- Maps from each image's valid size (:func:`sine_pos_embed_from_sizes`): the mask network's Deformable
  DETR embedding (temperature 10000, offset −0.5), independent of the padding.
- Boxes (:func:`sine_embed_coords`): ``gen_sineembed_for_position`` — temperature 10000, scale 2π,
  one block of ``F`` features per coordinate, in a family-specific coordinate order (DINO: y, x, w, h;
  H-DETR: x, y, w, h). Officially ``F = 128`` for ``d = 256``; the detectors use ``F = d / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def sine_features(t: Tensor, num_feats: int, temperature: float) -> Tensor:
    """[...] → [..., num_feats]: sin on even, cos on odd feature indices."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=t.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    x = t[..., None] / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of a padded feature map from its padding mask.

    Args:
        num_feats: features per axis (``d / 2``); the output has ``2·num_feats`` channels.
        temperature_h, temperature_w: frequency bases for the y and x axes.
        normalize: divide the cumulative position by the valid extent and multiply by ``scale``.
        offset: added to the cumulative position before normalising (H-DETR: −0.5, DINO: 0).
        scale: 2π by default.
    """

    def __init__(
        self,
        *,
        num_feats: int,
        temperature_h: float = 10000.0,
        temperature_w: float = 10000.0,
        normalize: bool = True,
        offset: float = 0.0,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_feats, self.temperature_h, self.temperature_w = num_feats, temperature_h, temperature_w
        self.normalize, self.offset, self.scale = normalize, offset, scale

    def forward(self, mask: Tensor) -> Tensor:
        """``mask`` [B, H, W] True at padding → [B, 2·num_feats, H, W] float32 (``[pos_y, pos_x]``)."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + eps) * self.scale
        pos_y = sine_features(y, self.num_feats, self.temperature_h)
        pos_x = sine_features(x, self.num_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_pos_embed_from_sizes(
    valid_hw: Tensor, hw: tuple[int, int], dim: int, *, temperature: float = 10000.0
) -> Tensor:
    """Deformable DETR's normalised sine embedding of a map, from each image's valid size.

    Equals :class:`PositionEmbeddingSine` (offset −0.5) inside the valid region; it is computed from
    the sizes instead of the padding mask, so it does not depend on how much padding a map carries.

    Args:
        valid_hw: [B, 2] valid (h, w) of the map of each image.
        hw: the (padded) map size.
        dim: embedding width (even); half for y, half for x.

    Returns:
        [B, H·W, dim] (row-major tokens), finite also at padding (never read there).
    """
    h, w = hw
    dev = valid_hw.device
    scale = 2 * math.pi
    vh = valid_hw[:, 0].float().clamp(min=1)[:, None, None]
    vw = valid_hw[:, 1].float().clamp(min=1)[:, None, None]
    # (cumsum - 0.5) / (last + eps) · 2π, where the cumsum of the not-padding mask is index + 1
    y = (torch.arange(h, device=dev, dtype=torch.float32)[None, :, None] + 0.5) / (vh + 1e-6) * scale
    x = (torch.arange(w, device=dev, dtype=torch.float32)[None, None, :] + 0.5) / (vw + 1e-6) * scale
    y, x = y.expand(-1, h, w), x.expand(-1, h, w)
    npf = dim // 2
    return torch.cat((sine_features(y, npf, temperature), sine_features(x, npf, temperature)), dim=3).flatten(1, 2)


def sine_embed_coords(
    coords: Tensor, *, num_feats: int, order: Sequence[int], temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """Sine-embed normalised coordinates (query reference points / boxes).

    Args:
        coords: [..., k] in [0, 1] (k = 2 points, 4 boxes cx, cy, w, h).
        num_feats: features per coordinate (official 128 at d = 256).
        order: which coordinate goes in which block, e.g. DINO (1, 0, 2, 3) = (y, x, w, h).

    Returns:
        [..., len(order)·num_feats].
    """
    return torch.cat([sine_features(coords[..., i] * scale, num_feats, temperature) for i in order], dim=-1)
