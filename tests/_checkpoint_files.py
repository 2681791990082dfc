"""Checkpoint files as the official code bases write them, for ``--detector auto``: tiny DINO and
H-Deformable-DETR models with the training args they save, and a small detrex-style DINO in detrex's layout."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mfdetr.detectors.backbones import BackboneConfig
from mfdetr.detectors.dino import DinoConfig
from mfdetr.detectors.dino.presets import DINO_CONFIGS, build_dino_model, dino_preset
from mfdetr.detectors.hdetr.presets import HDETR_CONFIGS

DINO_TINY = DINO_CONFIGS["dino_tiny"][0]
HDETR_TINY = HDETR_CONFIGS["hdetr_tiny"][0]
DINO_ARGS = {
    "modelname": "dino",
    "nheads": 4,
    "two_stage_type": "standard",
    "num_select": 50,
    "return_interm_indices": [1, 2, 3],
    "nms_iou_threshold": -1,
    "dec_pred_class_embed_share": True,
}
HDETR_ARGS = {
    "nheads": 4,
    "num_queries_one2one": 20,
    "num_queries_one2many": 12,
    "topk": 50,
    "two_stage": True,
    "with_box_refine": True,
    "mixed_selection": True,
    "look_forward_twice": True,
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny DINO or H-Deformable-DETR preset's model, seeded, in eval mode."""
    torch.manual_seed(seed)
    if family == "dino":
        return build_dino_model(DINO_TINY, preset=dino_preset("t", DINO_TINY, None, None)).eval()
    from mfdetr.detectors.common.arch import family_preset
    from mfdetr.detectors.hdetr.model import build_hdetr_model

    return build_hdetr_model(
        HDETR_TINY, preset=family_preset("t", "hdetr", HDETR_TINY, checkpoint_file=None, box_ap=None)
    ).eval()


def save_checkpoint(path: Path, model: torch.nn.Module, args: dict | None) -> Path:
    """An official-style checkpoint: ``model``, ``epoch`` and (unless ``None``) the training ``args``."""
    obj: dict = {"model": model.state_dict(), "epoch": 3}
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    torch.save(obj, path)
    return path


#: a small detrex-style DINO: ResNet (1 block per stage), 8 heads (detrex's), unshared heads, detrex positions
DETREX_CFG = DinoConfig(
    backbone=BackboneConfig(kind="resnet", out_indices=(1, 2, 3), params={"depths": (1, 1, 1, 1)}),
    hidden_dim=32,
    nheads=8,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=64,
    enc_n_points=2,
    dec_n_points=2,
    num_queries=20,
    num_feature_levels=4,
    num_classes=7,
    dn_labelbook_size=6,
    pe_temperature_h=10000.0,
    pe_temperature_w=10000.0,
    pe_offset=-0.5,
    dec_pred_class_embed_share=False,
    dec_pred_bbox_embed_share=False,
    num_select=300,
)


def to_detrex(key: str) -> str | None:
    """Our (official DINO) key → the detrex DINO key, written out from detrex's module names."""
    n_dec, n_in = DETREX_CFG.dec_layers, len(DETREX_CFG.backbone.out_indices)
    if key.startswith("transformer.enc_out_class_embed."):
        return key.replace("transformer.enc_out_class_embed.", f"class_embed.{n_dec}.")
    if key.startswith("transformer.enc_out_bbox_embed."):
        return key.replace("transformer.enc_out_bbox_embed.", f"bbox_embed.{n_dec}.")
    key = key.replace("backbone.0.body.conv1.", "backbone.stem.conv1.").replace(
        "backbone.0.body.bn1.", "backbone.stem.conv1.norm."
    )
    for i in range(4):
        key = key.replace(f"backbone.0.body.layer{i + 1}.", f"backbone.res{i + 2}.")
    key = re.sub(r"(res\d\.\d+)\.bn(\d)\.", r"\1.conv\2.norm.", key)
    key = re.sub(r"(res\d\.\d+)\.downsample\.0\.", r"\1.shortcut.", key)
    key = re.sub(r"(res\d\.\d+)\.downsample\.1\.", r"\1.shortcut.norm.", key)
    m = re.match(r"^input_proj\.(\d+)\.([01])\.(.*)$", key)
    if m:
        i, part = int(m.group(1)), "conv" if m.group(2) == "0" else "norm"
        return f"neck.convs.{i}.{part}.{m.group(3)}" if i < n_in else f"neck.extra_convs.{i - n_in}.{part}.{m.group(3)}"
    key = key.replace("transformer.level_embed", "transformer.level_embeds")
    key = re.sub(r"(encoder\.layers\.\d+)\.self_attn\.", r"\1.attentions.0.", key)
    key = re.sub(r"(encoder\.layers\.\d+)\.norm1\.", r"\1.norms.0.", key)
    key = re.sub(r"(encoder\.layers\.\d+)\.norm2\.", r"\1.norms.1.", key)
    key = re.sub(r"(decoder\.layers\.\d+)\.self_attn\.", r"\1.attentions.0.attn.", key)
    key = re.sub(r"(decoder\.layers\.\d+)\.cross_attn\.", r"\1.attentions.1.", key)
    key = re.sub(r"(decoder\.layers\.\d+)\.norm1\.", r"\1.norms.1.", key)
    key = re.sub(r"(decoder\.layers\.\d+)\.norm2\.", r"\1.norms.0.", key)
    key = re.sub(r"(decoder\.layers\.\d+)\.norm3\.", r"\1.norms.2.", key)
    key = re.sub(r"(coder\.layers\.\d+)\.linear1\.", r"\1.ffns.0.layers.0.0.", key)
    return re.sub(r"(coder\.layers\.\d+)\.linear2\.", r"\1.ffns.0.layers.1.", key)


def detrex_file(path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A :data:`DETREX_CFG` model (random BN statistics) and its checkpoint saved in detrex's layout."""
    torch.manual_seed(seed)
    model = build_dino_model(DETREX_CFG, preset=dino_preset("t", DETREX_CFG, None, None)).eval()
    with torch.no_grad():  # random BN statistics, so that a mis-mapped norm buffer changes the outputs
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    sd = {to_detrex(k): v for k, v in model.state_dict().items()}
    n = DETREX_CFG.dec_layers  # detrex aliases the encoder heads under transformer.decoder too
    sd.update(
        {
            f"transformer.decoder.{k}": v
            for k, v in list(sd.items())
            if k.startswith((f"class_embed.{n}.", f"bbox_embed.{n}."))
        }
    )
    assert not any(k.startswith(("input_proj", "backbone.0.")) for k in sd)
    torch.save({"model": sd, "iteration": 100}, path)  # detectron2's checkpointer: no args
    return model, path
