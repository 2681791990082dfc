"""H-Deformable-DETR presets: every number of every released model in one place, registered by name.

Sources: HDETR/H-Deformable-DETR ``configs/two_stage/deformable-detr-hybrid-branch/`` (the
"hybrid branch … dp0_mqs_lft … two_stage" scripts), ``main.py`` defaults and the README model table
(box AP on COCO val2017, ``topk=100``).
Release assets: ``github.com/HDETR/H-Deformable-DETR/releases/download/v0.1/<file>``.
"""

from __future__ import annotations

from mfdetr.contracts import DetectorPreset
from mfdetr.detectors.backbones.factory import BackboneConfig
from mfdetr.detectors.common.arch import family_preset, register_family
from mfdetr.detectors.common.checkpoint import CheckpointSource
from mfdetr.detectors.hdetr.config import HDetrConfig
from mfdetr.detectors.hdetr.model import HDetrDetector, build_hdetr_model, hdetr_checkpoint_format

_R50 = {"depths": (3, 4, 6, 3)}
#: ``TransformerBackbone('swin_large')``: embed 192, depths 2-2-18-2, heads 6-12-24-48, **window 7**
_SWIN_L = BackboneConfig(
    kind="swin",
    out_indices=(1, 2, 3),
    params={"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 7},
)
#: release asset names: ``<backbone prefix>hybrid_branch_..._two_stage_<epochs>eps.pth``
_TAIL = (
    "hybrid_branch_lambda1_group6_t1500{n}_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_"
    "two_stage_36eps.pth"
)
_SWIN_NOTE = "H-Deformable-DETR Swin-L (window 7), {q} queries, 36 epochs"

#: name → (config, checkpoint file, box AP, notes); all hybrid branch: 1500 one-to-many queries
HDETR_CONFIGS: dict[str, tuple[HDetrConfig, str | None, float | None, str]] = {
    "hdetr_r50": (
        HDetrConfig(
            backbone=BackboneConfig(kind="resnet", out_indices=(1, 2, 3), params=_R50),
            num_queries_one2one=300,
            num_queries_one2many=1500,
        ),
        "r50_" + _TAIL.format(n=""),
        50.0,
        "H-Deformable-DETR R50, 300 queries, 36 epochs (the 12-epoch file, 48.7 AP, has the same architecture)",
    ),
    "hdetr_swinl": (
        HDetrConfig(backbone=_SWIN_L, num_queries_one2one=900, num_queries_one2many=1500),
        "drop_path0.5_swin_large_" + _TAIL.format(n="_n900"),
        57.4,
        _SWIN_NOTE.format(q=900) + " (57.6 AP with topk=300; the 'decay0.05_' file, 57.8 AP, has the same "
        "architecture)",
    ),
    "hdetr_swinl_q300": (
        HDetrConfig(backbone=_SWIN_L, num_queries_one2one=300, num_queries_one2many=1500),
        "drop_path0.5_swin_large_" + _TAIL.format(n=""),
        57.1,
        _SWIN_NOTE.format(q=300),
    ),
    "hdetr_tiny": (
        HDetrConfig(
            backbone=BackboneConfig(kind="tiny", out_indices=(1, 2, 3), params={"widths": (8, 16, 32, 64)}),
            hidden_dim=32,
            nheads=4,
            enc_layers=4,
            dec_layers=2,
            dim_feedforward=64,
            enc_n_points=2,
            dec_n_points=2,
            num_feature_levels=4,
            num_queries_one2one=20,
            num_queries_one2many=12,
            num_select=50,
        ),
        None,
        None,
        "tiny random H-DETR for tests (same code as the real presets)",
    ),
}


def build_hdetr(
    cfg: HDetrConfig,
    *,
    preset: DetectorPreset | None = None,
    checkpoint: CheckpointSource | None = None,
    device: str = "cpu",
) -> HDetrDetector:
    """Build a frozen H-DETR from a config; load ``checkpoint`` (file or state dict) strictly if given."""
    preset = preset or family_preset("hdetr_custom", "hdetr", cfg, checkpoint_file=None, box_ap=None)
    model = build_hdetr_model(cfg, preset=preset)
    if checkpoint is not None:
        from mfdetr.detectors.dino.detrex import load_hdetr_checkpoint

        load_hdetr_checkpoint(model, checkpoint, hdetr_checkpoint_format(cfg), inv_sigmoid_eps=cfg.inv_sigmoid_eps)
    return model.to(device).freeze()  # type: ignore[return-value]


HDETR_PRESETS: dict[str, DetectorPreset] = {
    name: family_preset(name, "hdetr", cfg, checkpoint_file=file, box_ap=ap, notes=notes)
    for name, (cfg, file, ap, notes) in HDETR_CONFIGS.items()
}
register_family(HDETR_PRESETS, {name: entry[0] for name, entry in HDETR_CONFIGS.items()}, build_hdetr)

__all__ = ["HDETR_CONFIGS", "HDETR_PRESETS", "build_hdetr"]
