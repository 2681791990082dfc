"""``dino_tiny64``: the ``dino_tiny`` preset (same DINO code, random weights) with 64-px preprocessing,
so end-to-end tests on tiny images do not upsample them to 800 px. Importing this module registers it
(idempotent): commands select it with ``MFDETR_PLUGINS=tests._tiny_detector``.

Also the tiny MaskNet config the predict/demo tests use (sized for d = 32), as run-config overrides.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mfdetr.contracts import Preprocessing
from mfdetr.detectors.dino.presets import DINO_CONFIGS, build_dino
from mfdetr.detectors.registry import get_preset, list_detectors, register_detector

NAME = "dino_tiny64"
PLUGIN = "tests._tiny_detector"
_CFG = DINO_CONFIGS["dino_tiny"][0]
PRESET = dataclasses.replace(
    get_preset("dino_tiny"),
    name=NAME,
    preprocessing=Preprocessing(short_side=64, max_size=96),
    notes="dino_tiny with 64-px preprocessing (tests)",
)

#: ``section.key=value`` overrides making MaskNet tiny for d = 32 (every part present, as the paper's)
TINY_MASKNET = (
    "masknet.num_queries=10",
    "masknet.roi_size=8",
    "masknet.neck.groups=8",
    "masknet.image_encoder.layers=1",
    "masknet.image_encoder.heads=4",
    "masknet.image_encoder.points=2",
    "masknet.box_encoder.layers=1",
    "masknet.box_encoder.dim=16",
    "masknet.box_encoder.heads=2",
    "masknet.box_encoder.points=2",
    "masknet.query_encoder.heads=4",
    "masknet.mask_scoring.channels=8",
    "masknet.mask_scoring.convs=2",
    "masknet.mask_scoring.pool=2",
    "masknet.mask_scoring.fc_dim=16",
)


def build_tiny(*, checkpoint: object = None, device: str = "cpu") -> torch.nn.Module:
    return build_dino(_CFG, preset=PRESET, checkpoint=checkpoint, device=device)  # type: ignore[arg-type]


if NAME not in list_detectors():
    register_detector(PRESET, build_tiny)


def save_detector_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Random ``dino_tiny`` weights (seeded) as a checkpoint file."""
    torch.manual_seed(seed)
    torch.save(build_tiny().state_dict(), path)
    return Path(path)


def tiny_masknet_config() -> Any:
    from mfdetr.config import apply_overrides, from_dict
    from mfdetr.masknet import MaskNetConfig

    return from_dict(MaskNetConfig, apply_overrides({}, [o[len("masknet.") :] for o in TINY_MASKNET]), where="masknet")


def save_masknet_checkpoint(path: Path, preset_name: str, *, seed: int) -> Path:
    """A random tiny MaskNet (:func:`tiny_masknet_config`) for ``preset_name`` saved as a plain checkpoint."""
    import dataclasses

    from mfdetr.config import to_dict
    from mfdetr.detectors import get_preset
    from mfdetr.masknet import build_masknet

    preset = get_preset(preset_name)
    cfg = dataclasses.replace(tiny_masknet_config(), enc_layer=min(3, preset.num_encoder_layers))
    torch.manual_seed(seed)
    model = build_masknet(
        cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
    )
    with torch.no_grad():  # non-trivial mask-scoring outputs (default init can saturate)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(
        {
            "masknet_config": to_dict(cfg),
            "model": model.state_dict(),
            "detector": preset_name,
            "class_to_category": list(preset.class_to_category),
            "enc_layer": cfg.enc_layer,
        },
        path,
    )
    return path
