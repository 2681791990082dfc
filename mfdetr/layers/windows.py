"""Swin Transformer window helpers shared by the Swin backbone and the mask network's Swin block.

Both attend inside non-overlapping ``w × w`` windows of a channel-last map padded to window
multiples, with a learned relative position bias, and keep the regions of a cyclically shifted map
apart. They differ in how a region mask enters the logits (the backbone adds the official −100, the
mask network also masks padded keys), so only these pieces are shared.
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, Hp, Wp, C]`` (Hp, Wp multiples of ``window``) → ``[B * nW, window*window, C]``.

    Windows are ordered row-major over the window grid, batch-major overall (as the official code).
    """
    b, hp, wp, c = x.shape
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, hp: int, wp: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window*window, C]`` → ``[B, Hp, Wp, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, hp // window, wp // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)


def relative_position_index(window: int) -> Tensor:
    """``[N, N]`` int64 index into the ``(2w-1)^2`` bias table, N = window², official formula.

    For tokens i=(yi, xi) and j=(yj, xj): ``(yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def relative_position_bias(table: Tensor, index: Tensor) -> Tensor:
    """The bias of every (query, key) pair of a window per head: ``table`` [(2w-1)², heads] gathered
    by ``index`` [N, N] → ``[heads, N, N]``."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


def shifted_window_regions(hp: int, wp: int, window: int, shift: int, *, device: torch.device) -> Tensor:
    """Region label of every token of every window after the cyclic shift, ``[nW, N]`` int64.

    After the cyclic shift by ``-shift`` the padded map ``[Hp, Wp]`` splits into 3×3 regions
    (rows/cols ``[0, Hp-w)``, ``[Hp-w, Hp-shift)``, ``[Hp-shift, Hp)``); tokens with different labels
    come from different places of the unshifted map and must not attend to each other.
    """
    img = torch.zeros(1, hp, wp, 1, dtype=torch.long, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            img[:, hs, ws, :] = label
            label += 1
    return window_partition(img, window).squeeze(-1)
