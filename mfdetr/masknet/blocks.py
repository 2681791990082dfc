"""Building blocks shared by the image and box feature encoders and the query encoder.

- :class:`FFN` — Linear → GELU → Linear (the paper's FFN, sec. 3.2).
- :class:`DeformableEncoderLayer` — MSDeformAttn → LN → FFN → LN (post-norm, Deformable DETR's
  encoder layer with GELU; eq. 6). One layer at d = 256, 8 heads, 4 levels, 4 points, FFN 1024 has
  756,864 parameters (Table 2: 0.76 M).
- :class:`SwinBlock` — LN → (shifted) W-MSA → LN → FFN, pre-norm residuals, relative position bias
  (eq. 7), Swin's cyclic shift with its region mask. The map is padded bottom/right to a multiple of
  the window and every key outside the valid region is masked as well, so results inside the valid
  region do not depend on how much padding a map carries (windows stay anchored at the origin and
  the region mask keeps the rolled-in canvas edge apart).
- :class:`ConvNeXtBlock` — DWConv k×k → LN → FFN → layer scale, residual (eq. 8). 539,136 params at
  d = 256 (Table 2: 0.54 M).
- :class:`Attention` — multi-head attention with q/k/v projections and no output projection (the
  query encoder's O2O / B2O, whose #params in Table 5 imply three projections, see query_encoder.py).
- :func:`sine_pos_embed` — Deformable DETR's normalised sine embedding computed from valid sizes.
- :func:`masked_fill_outside` — zero a map outside each image's valid region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.ops import MSDeformAttn, SpatialShapes


def valid_mask(valid_hw: Tensor, hw: tuple[int, int]) -> Tensor:
    """[B, H, W] bool, True inside each image's valid region ``valid_hw`` [B, 2] (top-left anchored)."""
    h, w = hw
    ys = torch.arange(h, device=valid_hw.device)
    xs = torch.arange(w, device=valid_hw.device)
    return (ys[None, :, None] < valid_hw[:, 0, None, None]) & (xs[None, None, :] < valid_hw[:, 1, None, None])


def masked_fill_outside(x: Tensor, valid_hw: Tensor) -> Tensor:
    """Zero ``x`` [B, C, H, W] outside each image's valid region ``valid_hw`` [B, 2]."""
    m = valid_mask(valid_hw.to(x.device), (x.shape[-2], x.shape[-1]))
    return x.masked_fill(~m[:, None], 0.0)  # not a product: NaN/Inf garbage in the padding must vanish too


class FFN(nn.Module):
    """Linear(dim → hidden) → GELU → Linear(hidden → dim) on the last axis."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def sine_pos_embed(valid_hw: Tensor, hw: tuple[int, int], dim: int, *, temperature: float = 10000.0) -> Tensor:
    """Deformable DETR's normalised sine positional embedding, from valid sizes (padding-invariant).

    Args:
        valid_hw: [B, 2] valid (h, w) of the map of each image.
        hw: the (padded) map size.
        dim: embedding width (even); half for y, half for x.

    Returns:
        [B, H·W, dim] (row-major tokens), zero-free also at padding (never read there).
    """
    h, w = hw
    dev = valid_hw.device
    scale = 2 * math.pi
    vh = valid_hw[:, 0].float().clamp(min=1)[:, None, None]
    vw = valid_hw[:, 1].float().clamp(min=1)[:, None, None]
    # DDETR: (cumsum - 0.5) / (last + eps) * 2π, cumsum of the not-padding mask = index + 1
    y = (torch.arange(h, device=dev, dtype=torch.float32)[None, :, None] + 0.5) / (vh + 1e-6) * scale
    x = (torch.arange(w, device=dev, dtype=torch.float32)[None, None, :] + 0.5) / (vw + 1e-6) * scale
    y, x = y.expand(-1, h, w), x.expand(-1, h, w)
    npf = dim // 2
    dim_t = torch.arange(npf, device=dev, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).flatten(1, 2)


class DeformableEncoderLayer(nn.Module):
    """Multi-scale deformable encoder layer: MSDeformAttn → LN → FFN(GELU) → LN (post-norm, eq. 6).

    Args:
        dim: token width.
        levels: number of feature levels attended to (1 for the box encoder's RoI map).
        heads, points: deformable attention heads and sampling points per head and level.
        ffn_hidden: FFN hidden width (4·dim in the paper's tables).
    """

    def __init__(self, *, dim: int, levels: int, heads: int, points: int, ffn_hidden: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=dim, n_levels=levels, n_heads=heads, n_points=points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim=dim, hidden=ffn_hidden)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor, spatial_shapes: SpatialShapes,
                padding_mask: Tensor | None = None, num_out: int | None = None) -> Tensor:
        """``src`` [B, N, dim] tokens of all levels; ``pos`` [B or 1, N, dim]; ``reference_points``
        [B, N, L, 2]; ``spatial_shapes`` [L, 2] or (H_l, W_l) pairs; ``padding_mask`` [B, N] True at padding.

        ``num_out``: compute only the first ``num_out`` tokens' outputs ([B, num_out, dim]); every
        token still serves as a value, so these equal the first rows of the full result."""
        q = src if pos is None else src + pos
        x, ref = src, reference_points
        if num_out is not None:
            x, q, ref = src[:, :num_out], q[:, :num_out], reference_points[:, :num_out]
        x = self.norm1(x + self.self_attn(q, ref, src, spatial_shapes, None, padding_mask))
        return self.norm2(x + self.ffn(x))


def relative_position_index(window: int) -> Tensor:
    """Swin's [w², w²] index into the (2w-1)² relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


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
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        mask = bias.view(n, n, self.heads).permute(2, 0, 1)[None, None].to(q.dtype)  # [1, 1, h, n, n]
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
        nh, nw = hp // win, wp // win
        allowed = None  # [B or 1, nW, n, n] which keys each query may attend to
        if valid is not None or ph or pw:
            vm = torch.ones(1, h, w, dtype=torch.bool, device=x.device) if valid is None else valid
            vm = F.pad(vm, (0, pw, 0, ph), value=False)
            if s:
                vm = torch.roll(vm, shifts=(-s, -s), dims=(1, 2))
            kv = vm.view(-1, nh, win, nw, win).transpose(2, 3).reshape(-1, nh * nw, 1, win * win)
            allowed = kv
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
            same = self._same_region(hp, wp, x.device)[None]  # [1, nW, n, n]
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            # a query with no allowed key (padding only) attends freely: finite, and discarded anyway
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        yw = y.view(b, nh, win, nw, win, c).transpose(2, 3).reshape(b, nh * nw, win * win, c)
        yw = self.attn(yw, allowed)
        y = yw.view(b, nh, nw, win, win, c).transpose(2, 3).reshape(b, hp, wp, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.ffn(self.norm2(x))

    def _same_region(self, hp: int, wp: int, device: torch.device) -> Tensor:
        """Swin's shifted-window mask as booleans [nW, n, n]: True where query and key come from the
        same region of the rolled canvas (tokens rolled in from the opposite edge are kept apart)."""
        win, s = self.window, self.shift
        img = torch.zeros(hp, wp, dtype=torch.long, device=device)
        cnt = 0
        for hs in (slice(0, -win), slice(-win, -s), slice(-s, None)):
            for ws in (slice(0, -win), slice(-win, -s), slice(-s, None)):
                img[hs, ws] = cnt
                cnt += 1
        mw = img.view(hp // win, win, wp // win, win).transpose(1, 2).reshape(-1, win * win)
        return mw[:, None, :] == mw[:, :, None]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on [B, C, H, W]: x + γ·FFN(LN(DWConv_k(x))) (eq. 8), layer scale γ init 1e-6."""

    def __init__(self, *, dim: int, kernel: int = 7, ffn_hidden: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim=dim, hidden=ffn_hidden)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.ffn(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Multi-head attention with q/k/v projections and no output projection.

    Args:
        q_dim: width of the queries (and of the output).
        kv_dim: width of the keys/values tokens (projected to ``q_dim``).
        heads: attention heads.
    """

    def __init__(self, *, q_dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        if q_dim % heads:
            raise ValueError(f"q_dim ({q_dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q_proj = nn.Linear(q_dim, q_dim)
        self.k_proj = nn.Linear(kv_dim, q_dim)
        self.v_proj = nn.Linear(kv_dim, q_dim)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        """``q`` [N, Lq, q_dim], ``kv`` [N, Lk, kv_dim] → [N, Lq, q_dim]."""
        n, lq, c = q.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(n, t.shape[1], h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(kv)), split(self.v_proj(kv)))
        return out.transpose(1, 2).reshape(n, lq, c)
