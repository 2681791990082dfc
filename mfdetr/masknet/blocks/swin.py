"""``swin``: Swin Transformer blocks (eq. 7) on E_1 (image encoder) or the RoI maps (box encoder).

LN → (shifted) W-MSA → LN → FFN, pre-norm residuals, relative position bias, Swin's cyclic shift with
its region mask (the window helpers are the shared ones of :mod:`mfdetr.layers.windows`). The map is
padded bottom/right to a multiple of the window and every key outside the valid region is masked as
well, so results inside the valid region do not depend on how much padding a map carries (windows
stay anchored at the origin and the region mask keeps the rolled-in canvas edge apart). Shifted
windows (``w // 2``) in every second block; the box encoder uses the window ``min(w, S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.layers import (
    FFN,
    relative_position_bias,
    relative_position_index,
    shifted_window_regions,
    window_partition,
    window_reverse,
)
from mfdetr.masknet.blocks.common import valid_mask
from mfdetr.masknet.blocks.registry import BlockArgs, Built, FirstLevelBlock, register_block


class WindowAttention(nn.Module):
    """Window multi-head self-attention with Swin's relative position bias (qkv + proj + table)."""

    def __init__(self, *, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: Tensor, allowed: Tensor | None) -> Tensor:
        """``x`` [B, nW, n, dim] window tokens (n = w²); ``allowed`` [B or 1, nW, n or 1, n] bool: which
        keys a query may attend to (a pattern shared by all B maps is given once), or None (all)."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, nW, h, n, dh]
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        mask = bias[None, None].to(q.dtype)  # [1, 1, h, n, n]
        if allowed is not None:
            mask = mask.masked_fill(~allowed[:, :, None], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Swin Transformer block on a [B, H, W, C] map: x + W-MSA(LN(x)), then x + FFN(LN(x)) (eq. 7).

    Args:
        dim, heads: width and attention heads.
        window: window size w.
        shift: shift of the windows (``w // 2`` in every second block, 0 otherwise).
        ffn_hidden: FFN hidden width (4·dim).
    """

    def __init__(self, *, dim: int, heads: int, window: int, shift: int, ffn_hidden: int) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift ({shift}) must be in [0, window={window})")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, heads=heads, window=window)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim=dim, hidden=ffn_hidden)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """``x`` [B, H, W, C]; ``valid`` [B, H, W] bool (None: everything valid). Returns [B, H, W, C]."""
        b, h, w, c = x.shape
        win, s = self.window, self.shift
        ph, pw = (-h) % win, (-w) % win
        y = F.pad(self.norm1(x), (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        nwin = (hp // win) * (wp // win)
        allowed = None  # [B or 1, nW, n, n] which keys each query may attend to
        if valid is not None or ph or pw:
            vm = torch.ones(1, h, w, dtype=torch.bool, device=x.device) if valid is None else valid
            vm = F.pad(vm, (0, pw, 0, ph), value=False)
            if s:
                vm = torch.roll(vm, shifts=(-s, -s), dims=(1, 2))
            allowed = window_partition(vm[..., None], win).view(-1, nwin, 1, win * win)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            regions = shifted_window_regions(hp, wp, win, s, device=x.device)  # [nW, n]
            same = (regions[:, None, :] == regions[:, :, None])[None]  # [1, nW, n, n]
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            # a query with no allowed key (padding only) attends freely: finite, and discarded anyway
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        yw = self.attn(window_partition(y, win).view(b, nwin, win * win, c), allowed)
        y = window_reverse(yw.view(-1, win * win, c), win, hp, wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.ffn(self.norm2(x))


def _layers(count: int, args: BlockArgs, window: int) -> list[nn.Module]:
    return [
        SwinBlock(
            dim=args.dim, heads=args.heads, window=window, shift=(window // 2) * (i % 2), ffn_hidden=args.ffn_hidden
        )
        for i in range(count)
    ]


@register_block("swin")
class SwinBlocks(FirstLevelBlock):
    """Swin blocks, shifted windows in every second block; no extra embedding."""

    def build_image(self, count: int, args: BlockArgs, *, levels: int) -> Built:
        return _layers(count, args, args.window), None

    def build_box(self, count: int, args: BlockArgs, *, roi_size: int) -> Built:
        return _layers(count, args, min(args.window, roi_size)), None

    def encode_map(self, layers: nn.ModuleList, x: Tensor, valid_hw: Tensor) -> Tensor:
        vm = valid_mask(valid_hw.to(x.device), (x.shape[-2], x.shape[-1]))
        y = x.permute(0, 2, 3, 1)
        for layer in layers:
            y = layer(y, vm)
        return y.permute(0, 3, 1, 2)

    def encode_rois(
        self, layers: nn.ModuleList, rois: Tensor, embed: Tensor | None, *, checkpoint_tokens: int = 0
    ) -> Tensor:
        n, c, s, _ = rois.shape
        y = rois.permute(0, 2, 3, 1)
        for layer in layers:
            y = layer(y)
        return y.reshape(n, s * s, c)
