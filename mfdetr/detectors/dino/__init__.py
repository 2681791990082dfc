"""DINO frozen detectors (``dino_r50``, ``dino_r50_5scale``, ``dino_swinl``, ``dino_swinl_4scale``,
``dino_focal``, ``dino_tiny``), registered in :mod:`mfdetr.detectors.registry` on import."""

from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.model import DINO_CHECKPOINT_FORMAT, DinoDetector, build_dino_model
from mfdetr.detectors.dino.presets import DINO_CONFIGS, DINO_PRESETS, build_dino, dino_preset
from mfdetr.detectors.dino import demo as demo  # noqa: E402,F401  (registers the `demo` preset)

__all__ = [
    "DINO_CHECKPOINT_FORMAT",
    "DINO_CONFIGS",
    "DINO_PRESETS",
    "DinoConfig",
    "DinoDetector",
    "build_dino",
    "build_dino_model",
    "dino_preset",
]
