"""Tiny Swin and FocalNet backbones for the backbone tests and a parameter perturbation."""

from __future__ import annotations

import torch

from mfdetr.detectors.backbones.focalnet import FocalNetConfig, build_focalnet
from mfdetr.detectors.backbones.swin import SwinConfig, build_swin


def tiny_focalnet(out_indices=(0, 1, 2, 3), **kw):
    cfg = dict(embed_dim=16, depths=(1, 1, 2, 1), focal_levels=2, focal_windows=3)
    cfg.update(kw)
    return build_focalnet(FocalNetConfig(out_indices=out_indices, **cfg)).eval()


def tiny_swin(out_indices=(0, 1, 2, 3), window=3, depths=(1, 1, 2, 1)):
    return build_swin(
        SwinConfig(embed_dim=16, depths=depths, num_heads=(1, 2, 2, 4), window_size=window, out_indices=out_indices)
    ).eval()


def randomize_(model: torch.nn.Module) -> None:
    """Perturb every parameter (LayerNorms, biases, layer-scale gammas, the position table) so nothing
    is trivially small."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
