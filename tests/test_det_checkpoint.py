"""Strict checkpoint loading: official key manifests (full-size presets on the meta device), the
remapper (wrappers, ``module.`` prefix, aliases) and its error messages."""

from __future__ import annotations

import argparse

import pytest
import torch

from mfdetr.detectors.common import load_state_dict_strict
from mfdetr.detectors.dino import DINO_CONFIGS, DINO_PRESETS, build_dino, build_dino_model
from mfdetr.errors import MfdetrError
from tests._manifests import read_manifest

#: preset → official manifest (DETECTORS.md table)
PRESET_MANIFEST = {
    "dino_r50": "dino_r50_4scale",
    "dino_r50_5scale": "dino_r50_5scale",
    "dino_swinl": "dino_swinl_5scale",
    "dino_swinl_4scale": "dino_swinl_4scale",
    "dino_focal": "dino_focalnet_l_5scale",
}


@pytest.mark.parametrize("preset", sorted(PRESET_MANIFEST))
def test_full_preset_matches_official_manifest(preset):
    """Every key of the official state dict exists in ours with the same shape and dtype, nothing extra,
    and the strict loader accepts a (meta) state dict built from the manifest."""
    cfg = DINO_CONFIGS[preset][0]
    manifest = read_manifest(PRESET_MANIFEST[preset])
    with torch.device("meta"):
        model = build_dino_model(cfg, preset=DINO_PRESETS[preset])
    preset_meta = DINO_PRESETS[preset]
    assert preset_meta.c1_channels == model.body.c1_spec.channels
    assert preset_meta.level_strides[: len(model.body.out_indices)] == tuple(s.stride for s in model.body.out_specs)
    ours = model.state_dict()
    assert sorted(set(manifest) - set(ours)) == []
    assert sorted(set(ours) - set(manifest)) == []
    bad = [(k, tuple(v.shape), manifest[k]) for k, v in ours.items() if (tuple(v.shape), v.dtype) != manifest[k]]
    assert bad == []
    sd = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in manifest.items()}
    load_state_dict_strict(model, sd)


def official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a released DINO checkpoint holds: our names are the official ones; a frozen-BN body may
    carry stray ``num_batches_tracked`` buffers."""
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = DINO_CONFIGS["dino_tiny"][0]
    torch.manual_seed(1)
    src = build_dino(cfg)
    torch.manual_seed(2)
    dst = build_dino(cfg)
    return cfg, src, dst


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 64, 128, generator=g)
    mask = torch.zeros(1, 64, 128, dtype=torch.bool)
    with torch.inference_mode():
        return model.forward_detr(images, mask, enc_layers=(4,))


@pytest.mark.parametrize("wrap", ["bare", "model", "ema_model", "state_dict", "module_prefix"])
def test_remapper_round_trip(tiny_pair, wrap, tmp_path):
    cfg, src, _ = tiny_pair
    sd = official_layout(src.state_dict())
    if wrap == "module_prefix":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}
    elif wrap == "bare":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 1, "args": argparse.Namespace(num_classes=91)}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    torch.manual_seed(99)
    dst = build_dino(cfg, checkpoint=path)
    a, b = _outputs(src), _outputs(dst)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes) and torch.equal(a.hs, b.hs)
    assert torch.equal(a.enc_memory[4], b.enc_memory[4])


def test_state_dict_source_and_dropped_bn_counters(tiny_pair):
    """A state dict (not a file) works; ``num_batches_tracked`` of a ResNet body is dropped."""
    from mfdetr.detectors.backbones import BackboneConfig, ResNetBackbone
    from mfdetr.detectors.common import CheckpointFormat, remap_state_dict
    from mfdetr.detectors.dino import DINO_CHECKPOINT_FORMAT

    cfg, src, _ = tiny_pair
    dst = build_dino(cfg, checkpoint={"model": src.state_dict()})
    assert torch.equal(_outputs(src).logits, _outputs(dst).logits)
    sd = {"backbone.0.body.bn1.weight": torch.ones(2), "backbone.0.body.bn1.num_batches_tracked": torch.tensor(3)}
    assert set(remap_state_dict(sd, DINO_CHECKPOINT_FORMAT, expected=set())) == {"backbone.0.body.bn1.weight"}
    fmt = CheckpointFormat(name="x", renames=((r"^body\.", "backbone.0.body."),))
    assert fmt.rename("body.layer1.0.conv1.weight") == "backbone.0.body.layer1.0.conv1.weight"
    assert BackboneConfig(kind="resnet").kind == "resnet" and ResNetBackbone is not None


def test_missing_unexpected_misshaped_keys_are_listed(tiny_pair):
    cfg, src, _ = tiny_pair
    sd = official_layout(src.state_dict())
    del sd["transformer.tgt_embed.weight"]
    sd["transformer.extra_thing"] = torch.zeros(3)
    sd["label_enc.weight"] = torch.zeros(5, 32)
    with pytest.raises(MfdetrError) as e:
        build_dino(cfg, checkpoint=sd)
    msg = str(e.value)
    assert "missing keys (1): transformer.tgt_embed.weight" in msg
    assert "unexpected keys (1): transformer.extra_thing" in msg
    assert "shape mismatch (1): label_enc.weight (5, 32) vs ours (9, 32)" in msg


def test_inconsistent_aliases_are_an_error(tiny_pair):
    """The 12 keys of the shared class head must hold one value."""
    cfg, src, _ = tiny_pair
    sd = official_layout(src.state_dict())
    assert "transformer.decoder.class_embed.1.weight" in sd and "class_embed.0.weight" in sd
    sd["transformer.decoder.class_embed.1.weight"] = sd["transformer.decoder.class_embed.1.weight"] + 1
    with pytest.raises(
        MfdetrError,
        match=r"share one tensor hold different values: transformer.decoder.class_embed.1.weight != transformer.decoder.class_embed.0.weight$",
    ):
        build_dino(cfg, checkpoint=sd)


def test_unreadable_files(tmp_path):
    cfg = DINO_CONFIGS["dino_tiny"][0]
    with pytest.raises(MfdetrError, match="checkpoint file not found"):
        build_dino(cfg, checkpoint=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MfdetrError, match="cannot read checkpoint"):
        build_dino(cfg, checkpoint=bad)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(MfdetrError, match="expected a dict"):
        build_dino(cfg, checkpoint=lst)
