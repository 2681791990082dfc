"""Mask scoring head (appendix A, eq. 12-13; Mask Scoring R-CNN, Huang et al. 2019).

``iou_i = sigmoid(MLP(Flatten(Conv(Cat(M_i, R_i)))))``: the predicted probability mask M_i
(1 channel, detached by default so the scoring loss does not pull on the masks) is concatenated with
the RoI features R_i (D channels) on the S×S grid; ``convs`` 3×3 stride-2 convolutions with ReLU
(S = 32 → 4×4), an adaptive average pool to ``pool``×``pool`` (a no-op at S = 32, so the MLP does not
depend on S), flatten, an MLP with ReLU, one output → sigmoid. The score is then s_i = c_i · iou_i
(eq. 13, post-processing).

The paper gives no layer sizes; its #params▲ (+0.73 M, Table 12) and #FLOPs▲ (+5.02 G ≈ 50 MMACs per
RoI) fix the scale. The default (D = 128: convs 129→128→128→128, MLP 2048→128→128→1) has 722,817
params (0.72 M) and ≈ 50 MMACs per 32×32 RoI.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskScoringHead(nn.Module):
    """Predicts each mask's IoU with its ground truth.

    Args:
        in_dim: D, channels of R_i (the mask adds one).
        channels: conv channels; convs: number of 3×3 stride-2 convs.
        pool: spatial size after the adaptive pool.
        fc_dim: MLP hidden width; fc_layers: MLP hidden layers.
        detach_mask: stop the gradient into the mask input.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        channels: int = 128,
        convs: int = 3,
        pool: int = 4,
        fc_dim: int = 128,
        fc_layers: int = 2,
        detach_mask: bool = True,
    ) -> None:
        super().__init__()
        if convs < 1 or fc_layers < 1:
            raise ValueError("mask scoring needs at least one conv and one hidden MLP layer")
        self.detach_mask = detach_mask
        layers: list[nn.Module] = []
        c = in_dim + 1
        for _ in range(convs):
            layers += [nn.Conv2d(c, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c = channels
        layers.append(nn.AdaptiveAvgPool2d(pool))
        self.convs = nn.Sequential(*layers)
        mlp: list[nn.Module] = [nn.Flatten(1)]
        f = channels * pool * pool
        for _ in range(fc_layers):
            mlp += [nn.Linear(f, fc_dim), nn.ReLU(inplace=True)]
            f = fc_dim
        mlp.append(nn.Linear(f, 1))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, mask_logits: Tensor, rois: Tensor) -> Tensor:
        """``mask_logits`` [N, S, S], ``rois`` [N, S·S, D] → predicted IoU [N] in [0, 1]."""
        n, s, _ = mask_logits.shape
        m = mask_logits.sigmoid()
        if self.detach_mask:
            m = m.detach()
        r = rois.transpose(1, 2).reshape(n, -1, s, s)
        x = self.convs(torch.cat((m[:, None].to(r.dtype), r), dim=1))
        return self.mlp(x).squeeze(-1).sigmoid()
