"""``convnext``: ConvNeXt blocks (eq. 8) on E_1 (image encoder) or the RoI maps (box encoder).

DWConv k×k → LN → FFN → layer scale, residual: 539,136 params at d = 256 (Table 2: 0.54 M). The image
encoder re-zeroes the padding after every block (the next DWConv must see zeros there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfdetr.layers import FFN
from mfdetr.masknet.blocks.common import masked_fill_outside
from mfdetr.masknet.blocks.registry import BlockArgs, Built, FirstLevelBlock, register_block


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


def _layers(count: int, args: BlockArgs) -> list[nn.Module]:
    return [ConvNeXtBlock(dim=args.dim, kernel=args.kernel, ffn_hidden=args.ffn_hidden) for _ in range(count)]


@register_block("convnext")
class ConvNeXtBlocks(FirstLevelBlock):
    """ConvNeXt blocks; no extra embedding."""

    def build_image(self, count: int, args: BlockArgs, *, levels: int) -> Built:
        return _layers(count, args), None

    def build_box(self, count: int, args: BlockArgs, *, roi_size: int) -> Built:
        return _layers(count, args), None

    def encode_map(self, layers: nn.ModuleList, x: Tensor, valid_hw: Tensor) -> Tensor:
        for layer in layers:
            x = masked_fill_outside(layer(x), valid_hw)
        return x

    def encode_rois(
        self, layers: nn.ModuleList, rois: Tensor, embed: Tensor | None, *, checkpoint_tokens: int = 0
    ) -> Tensor:
        x = rois
        for layer in layers:
            x = layer(x)
        return x.flatten(2).transpose(1, 2)
