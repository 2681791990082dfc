"""Neck on the backbone's stride-4 map C1 (appendix A, eq. 14): ``C1 = GN(PWConv(C1))``.

PWConv maps C1's channels to the transformer width d; GroupNorm statistics are taken over each
image's VALID region only, so the result does not depend on the padding of a batch or cache canvas.
At C1 = d = 256 with 32 groups: 65,792 + 512 = 66,304 params (Table 12: +0.07 M).

Both steps are affine per image: the GroupNorm statistics of ``PWConv(C1)`` follow from the mean and
covariance of C1 over the valid region, so the neck (and a linear map after it, such as the box
encoder's channel mapper) is one per-image matrix applied to C1. :meth:`Neck.mapped` computes it
that way and never builds the d-channel normalisation temporaries on the stride-4 grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        ct = torch.promote_types(x.dtype, torch.float32)  # statistics at least in float32
        xf = x.to(ct).view(b, g, c // g, h, w)
        mf = m.to(ct)[:, :, None]  # [B,1,1,H,W]
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
        """``c1`` [B, C1, H1, W1] (zero outside ``valid_hw`` [B, 2]) → [B, d, H1, W1], zero outside: the
        two steps as eq. 14 writes them (:meth:`mapped` computes the same in one)."""
        return self.norm(self.proj(c1), valid_hw)

    def mapped(self, c1: Tensor, valid_hw: Tensor, out_weight: Tensor | None = None) -> Tensor:
        """``forward(c1, valid_hw)``, then ``out_weight`` [D, d] (if given) applied at every position →
        [B, D (or d), H1, W1], zero outside ``valid_hw``; computed as ``A_b · C1 + k_b`` per image b (at
        least in float32, autocast off)."""
        b, cin, h, w = c1.shape
        m = valid_mask(valid_hw.to(c1.device), (h, w)).flatten(1)  # [B, HW]
        ct = torch.promote_types(c1.dtype, torch.float32)
        with torch.autocast(c1.device.type, enabled=False):
            x = c1.to(ct).flatten(2)  # [B, C1, HW], zero outside
            a, k = self._affine(x, m, None if out_weight is None else out_weight.to(ct))
            y = torch.baddbmm(k[..., None], a, x)
        return y.masked_fill(~m[:, None], 0.0).view(b, -1, h, w).to(c1.dtype)

    def _affine(self, x: Tensor, m: Tensor, out_weight: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per image, the matrix [B, D, C1] and offset [B, D] equal to ``out_weight · GN(PWConv(x))``
        on the valid positions ``m`` [B, HW] of ``x`` [B, C1, HW] (zero at the others)."""
        n = m.sum(1, keepdim=True).clamp(min=1).to(x.dtype)  # [B, 1] valid positions
        mf = m[:, None].to(x.dtype)
        mean_in = (x * mf).sum(2) / n  # [B, C1]
        xc = (x - mean_in[..., None]) * mf
        cov = torch.bmm(xc, xc.transpose(1, 2)) / n[..., None]  # [B, C1, C1] over the valid positions
        ct = x.dtype
        p_w, p_b = self.proj.weight.flatten(1).to(ct), self.proj.bias.to(ct)  # [d, C1], [d]
        mean_ch = F.linear(mean_in, p_w, p_b)  # [B, d] per-channel means of PWConv(x)
        var_ch = (torch.matmul(p_w, cov) * p_w).sum(-1)  # [B, d] per-channel variances
        g = self.norm.num_groups
        bsz, d = mean_ch.shape
        mean_g = mean_ch.view(bsz, g, -1).mean(-1, keepdim=True)  # [B, G, 1]
        var_g = (var_ch.view(bsz, g, -1) + (mean_ch.view(bsz, g, -1) - mean_g) ** 2).mean(-1, keepdim=True)
        scale = (torch.rsqrt(var_g + self.norm.eps).expand(-1, -1, d // g)).reshape(bsz, d)
        shift = (p_b - mean_g.expand(-1, -1, d // g).reshape(bsz, d)) * scale
        if self.norm.affine:
            gamma, beta = self.norm.weight.to(ct), self.norm.bias.to(ct)
            scale, shift = scale * gamma, shift * gamma + beta
        a = scale[..., None] * p_w  # [B, d, C1]
        if out_weight is None:
            return a, shift
        return torch.matmul(out_weight, a), F.linear(shift, out_weight)
