"""Frozen DETR-family detectors (stage 1). Never imported by stage 2 (MaskNet, cache reader)."""

from mfdetr.detectors.registry import build_detector, get_preset, list_detectors, register_detector

__all__ = ["build_detector", "get_preset", "list_detectors", "register_detector"]
