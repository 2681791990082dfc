"""The Mask Frozen-DETR mask network (stage 2): reads only :class:`mfdetr.contracts.DetectorOutput`.

Never imports :mod:`mfdetr.detectors` (DESIGN.md: the mask network only ever sees tensors).
"""

from mfdetr.masknet.config import (
    BoxEncoderConfig,
    ImageEncoderConfig,
    MaskHeadConfig,
    MaskNetConfig,
    MaskScoringConfig,
    NeckConfig,
    QueryEncoderConfig,
    baseline_config,
)
from mfdetr.masknet.model import MaskNet, MaskNetOutput, build_masknet

__all__ = [
    "BoxEncoderConfig", "ImageEncoderConfig", "MaskHeadConfig", "MaskNet", "MaskNetConfig", "MaskNetOutput",
    "MaskScoringConfig", "NeckConfig", "QueryEncoderConfig", "baseline_config", "build_masknet",
]
