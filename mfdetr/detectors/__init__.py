"""Frozen DETR-family detectors (stage 1). Never imported by stage 2 (MaskNet, cache reader).

Public API::

    from mfdetr.detectors import build_detector, list_detectors
    det = build_detector("dino_r50", checkpoint="checkpoint0033_4scale.pth")  # frozen, eval, strict load
    out = det.detect(batch, topk=100, enc_layers=(4, 6))   # DetectorOutput
    dets = det.predict(batch)                              # official post-processing (box AP)

Any size: ``build_dino(DinoConfig(...), checkpoint=...)``. Presets register on import.
"""

from mfdetr.detectors import dino as dino  # noqa: F401  (registers the DINO presets)
from mfdetr.detectors import hdetr as hdetr  # noqa: F401  (registers the H-DETR presets)
from mfdetr.detectors.common import Detections, DetrForward, FrozenDetr
from mfdetr.detectors.dino import DinoConfig, DinoDetector, build_dino
from mfdetr.detectors.registry import build_detector, get_preset, list_detectors, register_detector

__all__ = [
    "Detections",
    "DetrForward",
    "DinoConfig",
    "DinoDetector",
    "FrozenDetr",
    "build_detector",
    "build_dino",
    "get_preset",
    "list_detectors",
    "register_detector",
]
