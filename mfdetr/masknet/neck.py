"""Neck on the backbone's stride-4 map C1 (appendix A, eq. 14): ``C1 = GN(PWConv(C1))``.

PWConv maps C1's channels to the transformer width d; GroupNorm statistics are taken over each
image's VALID region only, so the result does not depend on the padding of a batch or cache canvas.
At C1 = d = 256 with 32 groups: 65,792 + 512 = 66,304 params (Table 12: +0.07 M).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfdetr.masknet.blocks import valid_mask


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics ignore positions outside each image's valid region."""

    def forward(self, x: Tensor, valid_hw: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if valid_hw is None:
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        m = valid_mask(valid_hw.to(x.device), (h, w))[:, None].to(x.dtype)  # [B,1,H,W]
        xf = x.float().view(b, g, c // g, h, w)
        mf = m.float()[:, :, None]  # [B,1,1,H,W]
        count = (mf.sum(dim=(2, 3, 4)) * (c // g)).clamp(min=1)  # [B,1]
        mean = (xf * mf).sum(dim=(2, 3, 4)) / count  # [B,G]
        var = (((xf - mean[..., None, None, None]) ** 2) * mf).sum(dim=(2, 3, 4)) / count
        y = (xf - mean[..., None, None, None]) * torch.rsqrt(var[..., None, None, None] + self.eps)
        y = y.view(b, c, h, w).to(x.dtype)
        if self.affine:
            y = y * self.weight[None, :, None, None].to(x.dtype) + self.bias[None, :, None, None].to(x.dtype)
        return y.masked_fill(m == 0, 0.0)


class Neck(nn.Module):
    """PWConv (1×1, C1 channels → d) + GroupNorm on C1 (eq. 14).

    Args:
        in_channels: channels of C1 (e.g. 256 for R50, 192 for FocalNet-L).
        dim: output width d (the queries' width).
        groups: GroupNorm groups.
    """

    def __init__(self, *, in_channels: int, dim: int, groups: int = 32) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"neck: d ({dim}) must be divisible by the GroupNorm groups ({groups})")
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.norm = MaskedGroupNorm(groups, dim)

    def forward(self, c1: Tensor, valid_hw: Tensor) -> Tensor:
        """``c1`` [B, C1, H1, W1] (zero outside ``valid_hw`` [B, 2]) → [B, d, H1, W1], zero outside."""
        return self.norm(self.proj(c1), valid_hw)
