"""Helpers of the mask network's blocks: valid-region masks and the query encoder's attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def forward(self, q: Tensor, kv: Tensor, *, fold: bool = False) -> Tensor:
        """``q`` [N, Lq, q_dim], ``kv`` [N, Lk, kv_dim] → [N, Lq, q_dim].

        ``fold`` (one query per row, ``Lq`` = 1): the key and value projections move to the query side,
        ``q·(W_k t + b_k) = (W_kᵀ q)·t + q·b_k`` and ``Σ a (W_v t + b_v) = W_v (Σ a t) + b_v``, so the Lk
        tokens are never projected. Same result."""
        n, lq, c = q.shape
        h = self.heads
        if fold and lq == 1:
            return self._one_query(q, kv)

        def split(t: Tensor) -> Tensor:
            return t.view(n, t.shape[1], h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(kv)), split(self.v_proj(kv)))
        return out.transpose(1, 2).reshape(n, lq, c)

    def _one_query(self, q: Tensor, kv: Tensor) -> Tensor:
        """:meth:`forward` for ``q`` [N, 1, q_dim] with the k/v projections folded into the query side."""
        n, _, c = q.shape
        h = self.heads
        qh = self.q_proj(q).view(n, h, c // h)  # [N, h, dh]
        wk = self.k_proj.weight.view(h, c // h, -1)  # [h, dh, kv_dim]
        wv = self.v_proj.weight.view(h, c // h, -1)
        scale = (c // h) ** -0.5
        qk = torch.einsum("nhe,hed->nhd", qh, wk) * scale  # [N, h, kv_dim]
        qb = (qh * self.k_proj.bias.view(h, -1)).sum(-1, keepdim=True) * scale  # [N, h, 1], q·b_k
        attn = (torch.einsum("nhd,nld->nhl", qk, kv) + qb).softmax(-1)  # [N, h, Lk]
        ctx = torch.einsum("nhl,nld->nhd", attn, kv)  # [N, h, kv_dim]
        out = torch.einsum("nhd,hed->nhe", ctx, wv).reshape(n, 1, c)
        return out + self.v_proj.bias
