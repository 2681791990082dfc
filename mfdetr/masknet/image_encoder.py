"""Image feature encoder F_e (sec. 3.2, eq. 5-8, Table 2) on the cached encoder maps E = [E_1..E_L].

- ``deformable`` (eq. 6): a stack of multi-scale deformable encoder layers over ALL levels, with
  Deformable DETR's sine positional embedding + a learned per-level embedding added to the queries.
  Reference points and positions come from each image's valid sizes and padded tokens are masked as
  values, so valid outputs do not depend on the canvas padding.
- ``swin`` (eq. 7) / ``convnext`` (eq. 8): blocks on the highest-resolution level E_1 only; the other
  levels pass through unchanged.

Only E_1 is consumed downstream (F = C1 + up(E_1)): :meth:`ImageEncoder.first_level` computes just that
(the last deformable layer then updates only E_1's tokens, still attending to every level);
:meth:`ImageEncoder.forward` returns every level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfdetr.masknet.blocks import (
    ConvNeXtBlock,
    DeformableEncoderLayer,
    SwinBlock,
    masked_fill_outside,
    sine_pos_embed,
    valid_mask,
)
from mfdetr.ops import shapes_tensor


def deformable_reference_points(valid_hw: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """Deformable DETR's encoder reference points from valid sizes.

    Args:
        valid_hw: [B, L, 2] valid (h, w) per level.
        shapes: (H_l, W_l) canvas size per level.

    Returns:
        [B, N, L, 2] (x, y) normalised by each level's canvas, N = Σ H_l·W_l: the centre of every
        token's pixel, mapped to every level in proportion to the valid sizes.
    """
    vh = valid_hw[..., 0].float().clamp(min=1)
    vw = valid_hw[..., 1].float().clamp(min=1)
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys = torch.arange(h, device=valid_hw.device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=valid_hw.device, dtype=torch.float32) + 0.5
        ys = ys[None, :, None] / vh[:, lvl, None, None]
        xs = xs[None, None, :] / vw[:, lvl, None, None]
        refs.append(torch.stack((xs.expand(-1, h, w), ys.expand(-1, h, w)), -1).flatten(1, 2))
    ref = torch.cat(refs, 1)  # [B, N, 2] normalised by the token's own valid size
    hw = shapes_tensor(shapes, valid_hw.device).float()  # sizes may be symbolic (ONNX export)
    hs, ws = hw[:, 0], hw[:, 1]
    ratios = torch.stack((vw / ws, vh / hs), -1)  # [B, L, 2] valid ratios (x, y)
    return ref[:, :, None] * ratios[:, None]


class ImageEncoder(nn.Module):
    """F_e: refines the encoder maps for all queries at once (eq. 5).

    Args:
        block: ``"deformable"``, ``"swin"`` or ``"convnext"``.
        layers: the stacked blocks (already built; may be empty).
        level_embed: [L, d] learned level embedding (deformable only) or ``None``.
    """

    def __init__(self, *, block: str, layers: list[nn.Module], level_embed: nn.Parameter | None = None) -> None:
        super().__init__()
        self.block = block
        self.layers = nn.ModuleList(layers)
        self.level_embed = level_embed

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, maps: list[Tensor], valid_hw: Tensor) -> list[Tensor]:
        """``maps`` per level [B, d, H_l, W_l] zero outside ``valid_hw`` [B, L, 2] → same shapes, zero outside."""
        if not self.layers:
            return maps
        if self.block == "deformable":
            return self._deformable(maps, valid_hw)
        return [self._single_level(maps[0], valid_hw[:, 0]), *maps[1:]]

    def first_level(self, maps: list[Tensor], valid_hw: Tensor) -> Tensor:
        """E_1 alone: ``forward(maps, valid_hw)[0]``, without updating the other levels' tokens in
        the last deformable layer (their outputs would not be used)."""
        if not self.layers:
            return maps[0]
        if self.block == "deformable":
            return self._deformable(maps, valid_hw, first_level_only=True)[0]
        return self._single_level(maps[0], valid_hw[:, 0])

    def _single_level(self, x: Tensor, v0: Tensor) -> Tensor:
        if self.block == "swin":
            vm = valid_mask(v0.to(x.device), (x.shape[-2], x.shape[-1]))
            y = x.permute(0, 2, 3, 1)
            for layer in self.layers:
                y = layer(y, vm)
            x = y.permute(0, 3, 1, 2)
        else:  # convnext: re-zero the padding after every block (the next DWConv must see zeros there)
            for layer in self.layers:
                x = masked_fill_outside(layer(x), v0)
        return masked_fill_outside(x, v0)

    def _deformable(self, maps: list[Tensor], valid_hw: Tensor, *, first_level_only: bool = False) -> list[Tensor]:
        b, d = maps[0].shape[:2]
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]  # sizes, symbolic under export
        dev = maps[0].device
        vhw = valid_hw.to(dev)
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B, N, d]
        pos = []
        for lvl, hw in enumerate(shapes):
            p = sine_pos_embed(vhw[:, lvl], hw, d)
            if self.level_embed is not None:
                p = p + self.level_embed[lvl]
            pos.append(p)
        pos_t = torch.cat(pos, 1).to(src.dtype)
        pad = ~torch.cat([valid_mask(vhw[:, lvl], hw).flatten(1) for lvl, hw in enumerate(shapes)], 1)
        ref = deformable_reference_points(vhw, shapes)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            n_out = shapes[0][0] * shapes[0][1] if first_level_only and i == last else None
            src = layer(src, pos_t, ref, shapes, pad, num_out=n_out)
        src = src.masked_fill(pad[:, :src.shape[1], None], 0.0)
        out, start = [], 0
        for h, w in shapes[:1] if first_level_only else shapes:
            out.append(src[:, start:start + h * w].transpose(1, 2).reshape(b, d, h, w))
            start += h * w
        return out


def build_image_encoder(*, block: str, layers: int, dim: int, levels: int, heads: int = 8, points: int = 4,
                        ffn_ratio: float = 4.0, swin_window: int = 16, convnext_kernel: int = 7,
                        level_embed: bool = True) -> ImageEncoder:
    """Build F_e with every number visible (Table 2: ``block`` × ``layers`` at width ``dim``)."""
    hidden = int(round(ffn_ratio * dim))
    mods: list[nn.Module]
    emb = None
    if block == "deformable":
        mods = [DeformableEncoderLayer(dim=dim, levels=levels, heads=heads, points=points, ffn_hidden=hidden)
                for _ in range(layers)]
        if layers and level_embed:
            emb = nn.Parameter(torch.empty(levels, dim))
            nn.init.normal_(emb)
    elif block == "swin":
        mods = [SwinBlock(dim=dim, heads=heads, window=swin_window, shift=(swin_window // 2) * (i % 2),
                          ffn_hidden=hidden) for i in range(layers)]
    elif block == "convnext":
        mods = [ConvNeXtBlock(dim=dim, kernel=convnext_kernel, ffn_hidden=hidden) for _ in range(layers)]
    else:
        raise ValueError(f"unknown image encoder block {block!r}")
    return ImageEncoder(block=block, layers=mods, level_embed=emb)
