"""``deformable``: multi-scale deformable encoder layers (eq. 6; Deformable DETR's encoder layer with GELU).

One layer at d = 256, 8 heads, 4 levels, 4 points, FFN 1024 has 756,864 parameters (Table 2: 0.76 M).

- Image encoder: a stack over ALL levels, with Deformable DETR's sine positional embedding + a
  learned per-level embedding added to the queries. Reference points and positions come from each
  image's valid sizes and padded tokens are masked as values, so valid outputs do not depend on the
  canvas padding. With ``first_level_only`` the last layer updates only E_1's tokens (still
  attending to every level).
- Box encoder: single-level layers over the S×S RoI map with a learned S×S positional embedding
  added to the queries (what Table 3's first deformable layer carries beyond the later ones:
  0.95 M = 0.68 M layer + 32·32·256 = 262,144).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfdetr.layers import DeformableEncoderLayer, encoder_reference_points, sine_pos_embed_from_sizes
from mfdetr.layers.deformable import TokenRows
from mfdetr.masknet.blocks.common import valid_mask
from mfdetr.masknet.blocks.registry import BlockArgs, Built, EncoderBlock, register_block
from mfdetr.ops import shapes_tensor


def _layers(count: int, args: BlockArgs, levels: int) -> list[nn.Module]:
    return [
        DeformableEncoderLayer(
            dim=args.dim,
            levels=levels,
            heads=args.heads,
            points=args.points,
            ffn_hidden=args.ffn_hidden,
            activation="gelu",
        )
        for _ in range(count)
    ]


def reference_points_from_sizes(valid_hw: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
    """Deformable DETR's encoder reference points from valid sizes ``valid_hw`` [B, L, 2] (h, w) on
    canvases of ``shapes`` (H_l, W_l) → [B, N, L, 2] (x, y), N = Σ H_l·W_l."""
    vh = valid_hw[..., 0].float().clamp(min=1)
    vw = valid_hw[..., 1].float().clamp(min=1)
    hw = shapes_tensor(shapes, valid_hw.device).float()  # sizes may be symbolic (ONNX export)
    ratios = torch.stack((vw / hw[:, 1], vh / hw[:, 0]), -1)  # [B, L, 2] valid ratios (x, y)
    return encoder_reference_points(shapes, ratios, torch.stack((vw, vh), -1))


@register_block("deformable")
class DeformableBlocks(EncoderBlock):
    """Multi-scale deformable encoder layers (MSDeformAttn → LN → FFN(GELU) → LN, post-norm)."""

    def build_image(self, count: int, args: BlockArgs, *, levels: int) -> Built:
        mods = _layers(count, args, levels)
        emb = None
        if count and args.level_embed:
            emb = nn.Parameter(torch.empty(levels, args.dim))
            nn.init.normal_(emb)
        return mods, emb

    def build_box(self, count: int, args: BlockArgs, *, roi_size: int) -> Built:
        mods = _layers(count, args, 1)
        pos = None
        if count:
            pos = nn.Parameter(torch.empty(roi_size * roi_size, args.dim))
            nn.init.normal_(pos, std=0.02)
        return mods, pos

    def encode_maps(
        self,
        layers: nn.ModuleList,
        maps: list[Tensor],
        valid_hw: Tensor,
        embed: Tensor | None,
        *,
        first_level_only: bool,
        needed: Tensor | None = None,
        checkpoint_tokens: int = 0,
    ) -> list[Tensor]:
        ckpt = checkpoint_tokens or None
        b, d = maps[0].shape[:2]
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]  # sizes, symbolic under export
        src, pos_t, pad, ref = self._tokens(maps, shapes, valid_hw.to(maps[0].device), embed)
        for layer in layers[:-1]:
            src = layer(src, pos_t, ref, shapes, pad, checkpoint_tokens=ckpt)
        if len(layers):
            if first_level_only and needed is not None:
                return [self._update_needed(layers[-1], src, pos_t, ref, shapes, pad, needed, ckpt)]
            n_out = shapes[0][0] * shapes[0][1] if first_level_only else None
            src = layers[-1](src, pos_t, ref, shapes, pad, num_out=n_out, checkpoint_tokens=ckpt)
        src = src.masked_fill(pad[:, : src.shape[1], None], 0.0)
        out, start = [], 0
        for h, w in shapes[:1] if first_level_only else shapes:
            out.append(src[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w))
            start += h * w
        return out

    @staticmethod
    def _tokens(
        maps: list[Tensor], shapes: list[tuple[int, int]], vhw: Tensor, embed: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Tokens [B, N, d] of all levels, their positions [B, N, d], padding [B, N] and reference points."""
        d = maps[0].shape[1]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = []
        for lvl, hw in enumerate(shapes):
            p = sine_pos_embed_from_sizes(vhw[:, lvl], hw, d)
            if embed is not None:
                p = p + embed[lvl]
            pos.append(p)
        pos_t = torch.cat(pos, 1).to(src.dtype)
        pad = ~torch.cat([valid_mask(vhw[:, lvl], hw).flatten(1) for lvl, hw in enumerate(shapes)], 1)
        return src, pos_t, pad, reference_points_from_sizes(vhw, shapes)

    @staticmethod
    def _update_needed(
        layer: nn.Module,
        src: Tensor,
        pos: Tensor,
        ref: Tensor,
        shapes: list[tuple[int, int]],
        pad: Tensor,
        needed: Tensor,
        ckpt: int | None,
    ) -> Tensor:
        """E_1 [B, d, H_1, W_1] after the last ``layer``, exact at the ``needed`` [B, H_1, W_1] tokens and zero
        elsewhere: the layer updates only those tokens (all tokens of ``src`` still serve as its values)."""
        (h, w), b, d = shapes[0], src.shape[0], src.shape[2]
        keep = needed.flatten(1) & ~pad[:, : h * w]
        bi, ti = keep.nonzero(as_tuple=True)  # grouped by image, in token order
        counts = keep.sum(1).tolist()
        slot = ti
        if bi.numel() == 0:  # one spare row keeps the layer in the autograd graph; it lands in a spare slot
            bi = ti = torch.zeros(1, dtype=torch.long, device=src.device)
            counts, slot = [1] + [0] * (b - 1), torch.full_like(ti, h * w)
        out = layer(src, pos, ref, shapes, pad, out_rows=TokenRows(bi, ti, counts), checkpoint_tokens=ckpt)
        e1 = out.new_zeros(b, h * w + 1, d).index_put((bi, slot), out)
        return e1[:, : h * w].transpose(1, 2).reshape(b, d, h, w)

    def encode_rois(
        self, layers: nn.ModuleList, rois: Tensor, embed: Tensor | None, *, checkpoint_tokens: int = 0
    ) -> Tensor:
        n, _, s, _ = rois.shape
        tokens = rois.flatten(2).transpose(1, 2)
        # pixel centres of the S×S map, which has no padding (valid ratios 1)
        ref = encoder_reference_points([(s, s)], torch.ones(1, 1, 2, device=tokens.device))
        ref = ref.to(tokens.dtype).expand(n, -1, -1, -1)
        pos = None if embed is None else embed[None].to(tokens.dtype)
        for layer in layers:
            tokens = layer(tokens, pos, ref, [(s, s)], None, checkpoint_tokens=checkpoint_tokens or None)
        return tokens
