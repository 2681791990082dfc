"""Strict loading of H-Deformable-DETR checkpoints: official key manifests (full-size presets on the
meta device), released-file layout (training dict, one-to-many query rows, thop leftovers) and errors."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from mfdetr.detectors.common import load_state_dict_strict, remap_state_dict
from mfdetr.detectors.hdetr import (
    HDETR_CHECKPOINT_FORMAT,
    HDETR_CONFIGS,
    HDETR_PRESETS,
    build_hdetr,
    build_hdetr_model,
    hdetr_checkpoint_format,
)
from mfdetr.errors import MfdetrError
from tests._manifests import read_manifest


@pytest.mark.parametrize("preset", ["hdetr_r50", "hdetr_swinl", "hdetr_swinl_q300"])
def test_full_preset_matches_official_manifest(preset):
    """Every key of the official state dict maps (through the preset's rename table) onto ours with
    the same shape and dtype (incl. the one-to-many rows of ``query_embed`` and the 56 aliased head
    keys), nothing extra, and the strict loader accepts a (meta) state dict built from the manifest."""
    cfg = HDETR_CONFIGS[preset][0]
    manifest = read_manifest(preset)
    with torch.device("meta"):
        model = build_hdetr_model(cfg, preset=HDETR_PRESETS[preset])
    ours = model.state_dict()
    sd = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in manifest.items()}
    mapped = remap_state_dict(sd, hdetr_checkpoint_format(cfg), expected=set(ours))
    assert len(mapped) == len(manifest)  # nothing dropped
    assert sorted(set(mapped) - set(ours)) == []
    assert sorted(set(ours) - set(mapped)) == []
    bad = [
        (k, tuple(v.shape), tuple(mapped[k].shape))
        for k, v in ours.items()
        if (tuple(v.shape), v.dtype) != (tuple(mapped[k].shape), mapped[k].dtype)
    ]
    assert bad == []
    rows = {"hdetr_r50": 1800, "hdetr_swinl": 2400, "hdetr_swinl_q300": 1800}[preset]
    assert manifest["query_embed.weight"][0] == (rows, 256)
    load_state_dict_strict(model, mapped)


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = HDETR_CONFIGS["hdetr_tiny"][0]
    torch.manual_seed(1)
    src = build_hdetr(cfg)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, src


def _outputs(model):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.forward_detr(images, torch.zeros(1, 64, 96, dtype=torch.bool), enc_layers=(4,))


def test_released_file_layout_round_trip(tiny_pair, tmp_path):
    """A training checkpoint (``model`` + args), DDP prefix, FLOP-counter leftovers dropped."""
    cfg, src = tiny_pair
    sd = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    sd.update(
        {
            "module.total_ops": torch.zeros(1, dtype=torch.float64),
            "module.total_params": torch.zeros(1),
            "module.transformer.encoder.layers.0.linear1.total_ops": torch.zeros(1),
            "module.backbone.0.body.stem.total_params": torch.zeros(1),
        }
    )
    path = tmp_path / "hdetr.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 11, "args": argparse.Namespace(num_queries_one2one=20)}, path)
    torch.manual_seed(99)
    dst = build_hdetr(cfg, checkpoint=path)
    a, b = _outputs(src), _outputs(dst)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes) and torch.equal(a.hs, b.hs)
    assert torch.equal(a.enc_memory[4], b.enc_memory[4])
    assert torch.equal(dst.query_embed.weight, src.query_embed.weight)  # one-to-many rows loaded too


def test_format_drops_only_the_listed_leftovers():
    keys = {
        "total_ops": 0,
        "class_embed.0.total_params": 0,
        "backbone.0.body.bn1.num_batches_tracked": 0,
        "query_embed.weight": 0,
        "transformer.pos_trans.weight": 0,
    }
    sd = {k: torch.zeros(1) for k in keys}
    assert set(remap_state_dict(sd, HDETR_CHECKPOINT_FORMAT, expected=set())) == {
        "query_embed.weight",
        "transformer.pos_trans.weight",
    }


def test_errors_list_offending_keys(tiny_pair):
    cfg, src = tiny_pair
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    del sd["transformer.pos_trans_norm.bias"]
    sd["transformer.tgt_embed.weight"] = torch.zeros(20, 32)  # a DINO key
    sd["query_embed.weight"] = torch.zeros(20, 32)  # one-to-many rows missing
    expected = (
        "state dict does not match the model: missing keys (1): transformer.pos_trans_norm.bias; "
        "unexpected keys (1): transformer.tgt_embed.weight; "
        "shape mismatch (1): query_embed.weight (20, 32) vs ours (32, 32)"
    )
    with pytest.raises(MfdetrError, match=f"^{re.escape(expected)}$"):
        build_hdetr(cfg, checkpoint=sd)


def test_inconsistent_head_aliases_are_an_error(tiny_pair):
    cfg, src = tiny_pair
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["transformer.decoder.bbox_embed.2.layers.0.bias"] += 1  # the proposal head's alias
    with pytest.raises(
        MfdetrError,
        match="share one tensor hold different values: bbox_embed.2.layers.0.bias "
        r"!= transformer.decoder.bbox_embed.2.layers.0.bias",
    ):
        build_hdetr(cfg, checkpoint=sd)


def test_swin_backbone_keys_follow_the_official_body_prefix(tmp_path):
    """Officially Swin sits in ``TransformerBackbone.body``: ``backbone.0.body.layers...`` load into
    our ``backbone.0.layers...`` (tiny Swin, same code as Swin-L)."""
    from mfdetr.detectors.backbones import BackboneConfig
    from mfdetr.detectors.hdetr import HDetrConfig

    swin = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window_size": 3}
    cfg = HDetrConfig(
        backbone=BackboneConfig(kind="swin", out_indices=(1, 2, 3), params=swin),
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=32,
        num_queries_one2one=5,
        num_queries_one2many=2,
    )
    torch.manual_seed(3)
    src = build_hdetr(cfg)
    official = {k.replace("backbone.0.", "backbone.0.body.", 1): v for k, v in src.state_dict().items()}
    assert "backbone.0.body.layers.0.blocks.0.attn.relative_position_index" in official
    torch.manual_seed(4)
    dst = build_hdetr(cfg, checkpoint={"model": official})
    assert torch.equal(_outputs(src).logits, _outputs(dst).logits)
