"""H-Deformable-DETR frozen detectors (``hdetr_r50``, ``hdetr_swinl``, ``hdetr_swinl_q300``,
``hdetr_tiny``), registered in :mod:`mfdetr.detectors.registry` on import."""

from mfdetr.detectors.hdetr.config import HDetrConfig
from mfdetr.detectors.hdetr.model import (
    HDETR_CHECKPOINT_FORMAT,
    HDETR_SWIN_CHECKPOINT_FORMAT,
    HDetrDetector,
    build_hdetr_model,
    hdetr_checkpoint_format,
)
from mfdetr.detectors.hdetr.presets import HDETR_CONFIGS, HDETR_PRESETS, build_hdetr
from mfdetr.detectors.hdetr.transformer import HDetrTransformer

__all__ = [
    "HDETR_CHECKPOINT_FORMAT",
    "HDETR_CONFIGS",
    "HDETR_PRESETS",
    "HDETR_SWIN_CHECKPOINT_FORMAT",
    "HDetrConfig",
    "HDetrDetector",
    "HDetrTransformer",
    "build_hdetr",
    "build_hdetr_model",
    "hdetr_checkpoint_format",
]
