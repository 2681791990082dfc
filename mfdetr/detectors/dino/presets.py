"""DINO presets: every number of every released model in one place, registered by name.

Sources: IDEA-Research/DINO configs ``config/DINO/DINO_{4,5}scale*.py`` and README (box AP, COCO
val2017, 36-epoch rows for R50, Swin-L 36 epochs), FocalNet/FocalNet-DINO
``config/DINO/DINO_5scale_focalnet_large_fl4.py`` and README. Checkpoint file names are those of the official model zoos.
"""

from __future__ import annotations

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones.factory import BackboneConfig
from mfdetr.detectors.common.arch import family_preset, register_family
from mfdetr.detectors.common.checkpoint import CheckpointSource
from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.model import DINO_CHECKPOINT_FORMAT, DinoDetector, build_dino_model

_R50 = {"depths": (3, 4, 6, 3)}
#: swin_L_384_22k as DINO builds it (window 12; ape off; patch norm on)
_SWIN_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12}
#: focalnet_L_384_22k_fl4 as FocalNet-DINO builds it
_FOCAL_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "focal_levels": 4, "focal_windows": 3}

#: name → (config, checkpoint file, box AP, notes)
DINO_CONFIGS: dict[str, tuple[DinoConfig, str | None, float | None, str]] = {
    "dino_r50": (
        DinoConfig(backbone=BackboneConfig(kind="resnet", out_indices=(1, 2, 3), params=_R50), num_feature_levels=4),
        "checkpoint0033_4scale.pth",
        50.9,
        "DINO-4scale R50, 36 epochs (README Table 2)",
    ),
    "dino_r50_5scale": (
        DinoConfig(backbone=BackboneConfig(kind="resnet", out_indices=(0, 1, 2, 3), params=_R50), num_feature_levels=5),
        "checkpoint0031_5scale.pth",
        51.2,
        "DINO-5scale R50, 36 epochs (README Table 2)",
    ),
    "dino_swinl": (
        DinoConfig(
            backbone=BackboneConfig(kind="swin", out_indices=(0, 1, 2, 3), params=_SWIN_L), num_feature_levels=5
        ),
        "checkpoint0027_5scale_swin.pth",
        58.5,
        "DINO-5scale Swin-L (swin_L_384_22k, window 12), 36 epochs",
    ),
    "dino_swinl_4scale": (
        DinoConfig(backbone=BackboneConfig(kind="swin", out_indices=(1, 2, 3), params=_SWIN_L), num_feature_levels=4),
        "checkpoint0029_4scale_swin.pth",
        58.0,
        "DINO-4scale Swin-L (swin_L_384_22k, window 12), 36 epochs",
    ),
    "dino_focal": (
        DinoConfig(
            backbone=BackboneConfig(kind="focalnet", out_indices=(0, 1, 2, 3), params=_FOCAL_L), num_feature_levels=5
        ),
        "focalnet_large_fl4_o365_finetuned_on_coco.pth",
        63.5,
        "FocalNet-L fl4 + DINO 5-scale, Objects365-pretrained, COCO-finetuned (FocalNet-DINO README; eval "
        "resolution not stated there, 800/1333 per its config base)",
    ),
    "dino_tiny": (
        DinoConfig(
            backbone=BackboneConfig(kind="tiny", out_indices=(1, 2, 3), params={"widths": (8, 16, 32, 64)}),
            hidden_dim=32,
            nheads=4,
            enc_layers=4,
            dec_layers=2,
            dim_feedforward=64,
            enc_n_points=2,
            dec_n_points=2,
            num_queries=20,
            num_feature_levels=4,
            dn_labelbook_size=8,
            num_select=50,
        ),
        None,
        None,
        "tiny random DINO for tests (same code as the real presets)",
    ),
}


def dino_preset(
    name: str, cfg: DinoConfig, checkpoint_file: str | None, box_ap: float | None, notes: str = ""
) -> DetectorPreset:
    """The :class:`DetectorPreset` metadata of a DINO config (800/1333 eval, ImageNet mean/std)."""
    return family_preset(name, "dino", cfg, checkpoint_file=checkpoint_file, box_ap=box_ap, notes=notes)


def build_dino(
    cfg: DinoConfig,
    *,
    preset: DetectorPreset | None = None,
    checkpoint: CheckpointSource | None = None,
    device: str = "cpu",
) -> DinoDetector:
    """Build a frozen DINO from a config; load ``checkpoint`` (file or state dict) strictly if given."""
    preset = preset or dino_preset("dino_custom", cfg, None, None)
    model = build_dino_model(cfg, preset=preset)
    if checkpoint is not None:
        from mfdetr.detectors.dino.detrex import load_dino_checkpoint

        load_dino_checkpoint(
            model,
            checkpoint,
            DINO_CHECKPOINT_FORMAT,
            position=(cfg.pe_temperature_h, cfg.pe_temperature_w, cfg.pe_offset),
        )
    return model.to(device).freeze()  # type: ignore[return-value]


DINO_PRESETS: dict[str, DetectorPreset] = {
    name: dino_preset(name, cfg, file, ap, notes) for name, (cfg, file, ap, notes) in DINO_CONFIGS.items()
}
register_family(DINO_PRESETS, {name: v[0] for name, v in DINO_CONFIGS.items()}, build_dino)
