"""ResNet backbones with frozen batch-norm, as the official DETR-family detectors build them.

Facts (IDEA-Research/DINO ``models/dino/backbone.py``, HDETR/H-Deformable-DETR ``models/backbone.py``):
torchvision ``resnet50`` body (no dilation) with ``FrozenBatchNorm2d`` (``eps = 1e-5`` inside the
rsqrt, four buffers, ``num_batches_tracked`` dropped on load); checkpoint keys
``backbone.0.body.{conv1,bn1,layer1..4}.*`` (no ``fc``/``avgpool``). The body always runs to layer4;
stage ``i`` is ``layer{i+1}`` (strides 4, 8, 16, 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

from mfdetr.contracts import ShapeSpec
from mfdetr.detectors.backbones.base import Backbone


class FrozenBatchNorm2d(nn.Module):
    """Batch-norm with fixed statistics and affine parameters (all four are buffers).

    ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias`` with ``eps = 1e-5`` (DINO's
    variant of torchvision's op). ``num_batches_tracked`` in a loaded state dict is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class _ResNetBody(nn.Module):
    """The torchvision ResNet trunk without ``avgpool``/``fc`` (official module names kept)."""

    def __init__(self, *, depths: Sequence[int]) -> None:
        super().__init__()
        net = ResNet(Bottleneck, list(depths), norm_layer=FrozenBatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class ResNetBackbone(Backbone):
    """Frozen-BN ResNet (Bottleneck) returning ``{stage: map}`` for ``out_indices`` ∪ {0}.

    Args:
        depths: Bottleneck blocks per stage; (3, 4, 6, 3) is ResNet-50 (stage channels 256, 512,
            1024, 2048 whatever the depths).
        out_indices: stages the detector uses, e.g. (1, 2, 3) for 4-scale DINO.
    """

    def __init__(self, *, depths: Sequence[int] = (3, 4, 6, 3), out_indices: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        self.body = _ResNetBody(depths=depths)
        self.out_indices = tuple(out_indices)
        self.stage_specs = tuple(ShapeSpec(channels=256 * 2**i, stride=4 * 2**i) for i in range(4))

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        outs = self.body(x)
        return {i: outs[i] for i in sorted(set(self.out_indices) | {0})}

    def stage0(self) -> nn.Module:
        b = self.body
        return nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1)


def build_resnet50(*, out_indices: Sequence[int] = (1, 2, 3)) -> ResNetBackbone:
    """torchvision ResNet-50 with frozen BN (DINO / H-DETR ``backbone.0.body``)."""
    return ResNetBackbone(depths=(3, 4, 6, 3), out_indices=out_indices)
