"""Backbones of the frozen detectors, all on the :class:`Backbone` contract (stage 0 = C1 always).

Kinds: ``resnet`` (torchvision ResNet, frozen BN), ``tiny`` (test CNN), ``swin`` (``swin.swin_backbone``,
params = ``SwinConfig`` fields) and ``focalnet`` (``focalnet.focalnet_backbone``, params =
``FocalNetConfig`` fields); the last two are imported on first use.
"""

import importlib
from typing import Any

from mfdetr.detectors.backbones.base import Backbone
from mfdetr.detectors.backbones.factory import (
    BackboneConfig,
    backbone_kinds,
    build_backbone,
    register_backbone_kind,
)
from mfdetr.detectors.backbones.resnet import FrozenBatchNorm2d, ResNetBackbone, build_resnet50
from mfdetr.detectors.backbones.tiny import TinyConvBackbone


def _lazy(module: str, builder: str) -> Any:
    """A kind builder that imports its module on first use (Swin and FocalNet are large modules)."""

    def build(**kwargs: Any) -> Backbone:
        mod = importlib.import_module(module)
        return getattr(mod, builder)(**kwargs)

    build.__name__ = builder
    return build


register_backbone_kind("resnet", ResNetBackbone)
register_backbone_kind("tiny", TinyConvBackbone)
register_backbone_kind("swin", _lazy("mfdetr.detectors.backbones.swin", "swin_backbone"))
register_backbone_kind("focalnet", _lazy("mfdetr.detectors.backbones.focalnet", "focalnet_backbone"))

__all__ = [
    "Backbone",
    "BackboneConfig",
    "FrozenBatchNorm2d",
    "ResNetBackbone",
    "TinyConvBackbone",
    "backbone_kinds",
    "build_backbone",
    "build_resnet50",
    "register_backbone_kind",
]
