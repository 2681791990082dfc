"""Tiny DINO: output contract, freezing, invariants (padding, batching, determinism, top-K order)."""

from __future__ import annotations

import pytest
import torch

from mfdetr.contracts import DetectorOutput, FrozenDetector
from mfdetr.detectors import build_detector, get_preset, list_detectors
from mfdetr.detectors.backbones import BackboneConfig
from mfdetr.detectors.dino import DinoConfig, build_dino
from mfdetr.errors import MfdetrError
from tests._det_batches import crop_valid, make_batch, padded_levels


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_detector("dino_tiny")


def test_presets_registered():
    names = set(list_detectors())
    assert {"dino_r50", "dino_r50_5scale", "dino_swinl", "dino_swinl_4scale", "dino_focal", "dino_tiny"} <= names
    p = get_preset("dino_r50")
    assert p.level_strides == (8, 16, 32, 64) and p.hidden_dim == 256 and p.c1_channels == 256
    assert p.checkpoint_file == "checkpoint0033_4scale.pth" and p.num_classes == 91
    assert p.preprocessing.short_side == 800 and p.preprocessing.max_size == 1333
    assert get_preset("dino_r50_5scale").level_strides == (4, 8, 16, 32, 64)
    assert get_preset("dino_focal").checkpoint_file == "focalnet_large_fl4_o365_finetuned_on_coco.pth"
    assert get_preset("dino_focal").c1_channels == 192
    # the arch round-trips into the typed config
    assert DinoConfig.from_dict(p.arch).to_dict() == dict(p.arch)


def test_detect_contract(tiny):
    assert isinstance(tiny, FrozenDetector)
    batch = make_batch([(64, 128), (96, 70)])
    out = tiny.detect(batch, topk=12, enc_layers=(1, 4))
    assert isinstance(out, DetectorOutput)
    assert out.queries.shape == (2, 12, 32) and out.boxes.shape == (2, 12, 4) and out.logits.shape == (2, 12, 91)
    assert sorted(out.enc_maps) == [1, 4]
    # 4 levels at strides 8..64 of the padded 96x128 canvas
    assert [tuple(m.shape[-2:]) for m in out.enc_maps[4]] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert out.c1.shape == (2, 8, 24, 32)
    # nearest-resized pad masks (official): 64 of 96 rows at 2 rows → both rows valid
    assert out.level_valid_hw[0].tolist() == [[8, 16], [4, 8], [2, 4], [2, 2]]
    assert out.level_valid_hw[1].tolist() == [[12, 9], [6, 5], [3, 3], [2, 2]]
    scores = out.scores
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert not out.queries.requires_grad


def test_topk_are_the_best_queries(tiny):
    batch = make_batch([(64, 128)])
    full = tiny.forward_detr(batch.images, batch.pad_mask)
    out = tiny.detect(batch, topk=5)
    best = full.logits.sigmoid().amax(-1).topk(5, dim=1).indices[0]
    torch.testing.assert_close(out.logits[0], full.logits[0, best])
    torch.testing.assert_close(out.queries[0], full.hs[0, best])
    torch.testing.assert_close(out.boxes[0], full.boxes[0, best])


def test_frozen(tiny):
    assert not tiny.training
    assert sum(p.numel() for p in tiny.parameters() if p.requires_grad) == 0


def test_deterministic(tiny):
    batch = make_batch([(64, 128), (128, 64)])
    a, b = tiny.detect(batch, topk=8), tiny.detect(batch, topk=8)
    assert torch.equal(a.queries, b.queries) and torch.equal(a.boxes, b.boxes)
    assert all(torch.equal(x, y) for x, y in zip(a.enc_maps[4], b.enc_maps[4], strict=True))


def test_batch_members_are_independent(tiny):
    """The largest image (no padding) gives the same outputs alone and inside a batch with a smaller,
    padded image. (A *padded* image does not: the official input projections' GroupNorm statistics
    include the padded area — official evaluation runs batch size 1.)"""
    batch = make_batch([(128, 128), (64, 96)], seed=3)
    alone = make_batch([(128, 128)], seed=3)
    a = tiny.detect(alone, topk=10, enc_layers=(2, 4))
    b = tiny.detect(batch, topk=10, enc_layers=(2, 4)).select([0])
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.boxes, a.boxes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.queries, a.queries, atol=1e-5, rtol=1e-5)
    for ma, mb in zip(a.enc_maps[2] + a.enc_maps[4], b.enc_maps[2] + b.enc_maps[4], strict=True):
        torch.testing.assert_close(mb, ma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.c1, a.c1)


def test_transformer_ignores_padding_content(tiny):
    """Padded level tokens filled with zeros or with noise give identical outputs (values are masked,
    proposals at padding are +inf, the selection never prefers them)."""
    valid = [(8, 12), (4, 6), (2, 3), (1, 2)]
    canvas = [(11, 16), (6, 8), (3, 4), (2, 2)]
    c1 = torch.zeros(1, 8, 2, 2)
    with torch.inference_mode():
        a = tiny.forward_levels(*padded_levels(valid, canvas, 32, seed=1, noise=False), c1=c1, enc_layers=(1, 4))
        b = tiny.forward_levels(*padded_levels(valid, canvas, 32, seed=1, noise=True), c1=c1, enc_layers=(1, 4))
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.boxes, a.boxes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.hs, a.hs, atol=1e-5, rtol=1e-5)
    for layer in (1, 4):
        for lvl, (xa, xb) in enumerate(
            zip(a.levels.unflatten(a.enc_memory[layer]), b.levels.unflatten(b.enc_memory[layer]), strict=True)
        ):
            torch.testing.assert_close(crop_valid(xb, valid[lvl]), crop_valid(xa, valid[lvl]), atol=1e-5, rtol=1e-5)


def test_encoder_and_selection_alone_vs_padded(tiny):
    """Same level maps alone vs inside a padded canvas: the encoder memory (valid region) and the
    two-stage boxes are the same. (The decoder is not: officially the query positional embedding is
    computed from the reference box scaled by the level-0 valid ratio.)"""
    valid = [(8, 12), (4, 6), (2, 3), (1, 2)]
    canvas = [(11, 16), (6, 8), (3, 4), (2, 2)]
    c1 = torch.zeros(1, 8, 2, 2)
    with torch.inference_mode():
        a = tiny.forward_levels(*padded_levels(valid, valid, 32, seed=1, noise=False), c1=c1, enc_layers=(1, 4))
        b = tiny.forward_levels(*padded_levels(valid, canvas, 32, seed=1, noise=True), c1=c1, enc_layers=(1, 4))
    for layer in (1, 4):
        for lvl, (xa, xb) in enumerate(
            zip(a.levels.unflatten(a.enc_memory[layer]), b.levels.unflatten(b.enc_memory[layer]), strict=True)
        ):
            torch.testing.assert_close(crop_valid(xb, valid[lvl]), xa, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.aux["refs"][0], a.aux["refs"][0], atol=1e-5, rtol=1e-4)


def test_bad_arguments(tiny):
    batch = make_batch([(64, 128)])
    with pytest.raises(MfdetrError, match="enc_layers"):
        tiny.detect(batch, enc_layers=(5,))
    with pytest.raises(MfdetrError, match="enc_layers"):
        tiny.detect(batch, enc_layers=(0,))
    with pytest.raises(MfdetrError, match="topk"):
        tiny.detect(batch, topk=21)


def test_predict_official_postprocess(tiny):
    batch = make_batch([(64, 128), (96, 64)])
    dets = tiny.predict(batch, num_select=30)
    full = tiny.forward_detr(batch.images, batch.pad_mask)
    for b, det in enumerate(dets):
        prob = full.logits[b].sigmoid().flatten()
        top = prob.topk(30)
        torch.testing.assert_close(det.scores, top.values)
        assert torch.equal(det.labels, top.indices % 91)
        assert torch.equal(det.category_ids, det.labels)  # coco91 identity map
        cxcywh = full.boxes[b, top.indices // 91]
        h, w = batch.orig_hw[b].tolist()
        x0 = (cxcywh[:, 0] - cxcywh[:, 2] / 2) * w
        torch.testing.assert_close(det.boxes[:, 0], x0)
        assert torch.all(det.scores[:-1] >= det.scores[1:])


@pytest.mark.parametrize("levels,out_indices", [(5, (0, 1, 2, 3)), (3, (1, 2, 3)), (2, (2, 3))])
def test_any_size_config(levels, out_indices):
    """The same code at other sizes: 5-scale (stage 0 used), no extra level, 2 levels; d=64."""
    cfg = DinoConfig(
        backbone=BackboneConfig(kind="tiny", out_indices=out_indices, params={"widths": (8, 8, 16, 16)}),
        hidden_dim=64,
        nheads=8,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=32,
        enc_n_points=1,
        dec_n_points=3,
        num_queries=7,
        num_feature_levels=levels,
        num_classes=5,
        dn_labelbook_size=5,
    )
    det = build_dino(cfg)
    out = det.detect(make_batch([(64, 128)]), topk=7, enc_layers=(2,))
    assert len(out.enc_maps[2]) == levels and out.logits.shape == (1, 7, 5) and out.queries.shape == (1, 7, 64)
    assert det.transformer.decoder.ref_point_head.layers[0].in_features == 128  # d/2 per coordinate × 4
    assert len(det.preset.level_strides) == levels


def test_config_errors():
    with pytest.raises(MfdetrError, match="hidden_dim"):
        DinoConfig(backbone=BackboneConfig(kind="tiny"), hidden_dim=48)
    with pytest.raises(MfdetrError, match="out_indices"):
        BackboneConfig(kind="tiny", out_indices=(3, 1))
    with pytest.raises(MfdetrError, match="unknown DinoConfig keys"):
        DinoConfig.from_dict({"backbone": {"kind": "tiny"}, "hiden_dim": 3})


@pytest.mark.parametrize(
    "name", ["dino_r50", "dino_r50_5scale", "dino_swinl", "dino_swinl_4scale", "dino_focal", "dino_tiny"]
)
def test_preset_json_round_trip_rebuilds_the_same_architecture(name):
    """A cache manifest stores ``preset.to_dict()`` as JSON; its ``arch`` rebuilds the same model."""
    import json

    from mfdetr.detectors.dino import DINO_CONFIGS, build_dino_model

    preset = get_preset(name)
    d = json.loads(json.dumps(preset.to_dict()))
    cfg = DinoConfig.from_dict(d["arch"])
    assert cfg == DINO_CONFIGS[name][0]
    with torch.device("meta"):
        a = build_dino_model(cfg, preset=preset).state_dict()
        b = build_dino_model(DINO_CONFIGS[name][0], preset=preset).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize(
    "backbone",
    [
        BackboneConfig(
            kind="swin",
            out_indices=(0, 1, 2, 3),
            params={"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window_size": 3},
        ),
        BackboneConfig(
            kind="swin",
            out_indices=(1, 2, 3),
            params={"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window_size": 3},
        ),
        BackboneConfig(
            kind="focalnet",
            out_indices=(0, 1, 2, 3),
            params={"embed_dim": 16, "depths": (1, 1, 2, 1), "focal_levels": 2, "focal_windows": 3},
        ),
    ],
    ids=["swin-5scale", "swin-4scale", "focalnet-5scale"],
)
def test_tiny_dino_with_transformer_backbones(backbone):
    """The dino_swinl / dino_focal code paths at tiny size (same builders, same wiring)."""
    levels = len(backbone.out_indices) + 1
    cfg = DinoConfig(
        backbone=backbone,
        hidden_dim=32,
        nheads=4,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=32,
        enc_n_points=2,
        dec_n_points=2,
        num_queries=10,
        num_feature_levels=levels,
    )
    det = build_dino(cfg)
    out = det.detect(make_batch([(64, 96), (80, 64)]), topk=5, enc_layers=(2,))
    assert out.c1.shape == (2, 16, 20, 24) and len(out.enc_maps[2]) == levels
    assert det.preset.level_strides == ((4, 8, 16, 32, 64) if levels == 5 else (8, 16, 32, 64))
    assert det.preset.c1_channels == det.body.c1_spec.channels == 16
