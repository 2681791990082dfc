"""Tiny H-Deformable-DETR: presets, output contract, official semantics (class-0 proposal scoring,
one-to-one queries only, fixed query positions) and invariants (padding, batching, determinism,
top-K ordering)."""

from __future__ import annotations

import math

import pytest
import torch

from mfdetr.contracts import DetectorOutput, FrozenDetector
from mfdetr.detectors import build_detector, get_preset, list_detectors
from mfdetr.detectors.backbones import BackboneConfig
from mfdetr.detectors.hdetr import HDETR_CONFIGS, HDetrConfig, build_hdetr
from mfdetr.errors import MfdetrError
from tests._det_batches import crop_valid, make_batch, padded_levels

VALID = [(8, 12), (4, 6), (2, 3), (1, 2)]
CANVAS = [(11, 16), (6, 8), (3, 4), (2, 2)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    det = build_detector("hdetr_tiny")
    with torch.no_grad():  # zero-initialised box heads would make refinement a no-op
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return det


def test_presets_registered():
    assert {"hdetr_r50", "hdetr_swinl", "hdetr_swinl_q300", "hdetr_tiny"} <= set(list_detectors())
    p = get_preset("hdetr_r50")
    assert p.family == "hdetr" and p.level_strides == (8, 16, 32, 64) and p.hidden_dim == 256
    assert p.c1_channels == 256 and p.num_classes == 91 and p.num_encoder_layers == 6
    assert p.checkpoint_file == (
        "r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_"
        "bbox_refinement_plus_plus_two_stage_36eps.pth"
    )
    assert p.preprocessing.short_side == 800 and p.preprocessing.max_size == 1333
    cfg = HDetrConfig.from_dict(p.arch)
    assert cfg.to_dict() == dict(p.arch) and cfg.num_queries_one2one == 300 and cfg.num_select == 100
    s = get_preset("hdetr_swinl")
    assert s.checkpoint_file.startswith("drop_path0.5_swin_large_hybrid_branch_lambda1_group6_t1500_n900_dp0_mqs_lft")
    assert s.c1_channels == 192 and s.level_strides == (8, 16, 32, 64)
    swin = HDetrConfig.from_dict(s.arch)
    assert swin.num_queries_one2one == 900 and swin.backbone.params["window_size"] == 7
    assert swin.backbone.out_indices == (1, 2, 3)
    assert HDetrConfig.from_dict(get_preset("hdetr_swinl_q300").arch).num_queries_one2one == 300


def test_detect_contract(tiny):
    assert isinstance(tiny, FrozenDetector)
    out = tiny.detect(make_batch([(64, 128), (96, 70)]), topk=12, enc_layers=(1, 4))
    assert isinstance(out, DetectorOutput)
    assert out.queries.shape == (2, 12, 32) and out.boxes.shape == (2, 12, 4) and out.logits.shape == (2, 12, 91)
    assert sorted(out.enc_maps) == [1, 4]
    assert [tuple(m.shape[-2:]) for m in out.enc_maps[4]] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    assert out.c1.shape == (2, 8, 24, 32)
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])
    assert not tiny.training and not any(p.requires_grad for p in tiny.parameters())


def test_topk_are_the_best_one2one_queries(tiny):
    batch = make_batch([(64, 128)])
    full = tiny.forward_detr(batch.images, batch.pad_mask)
    assert full.logits.shape[1] == 20  # one-to-one queries only (query_embed has 20 + 12 rows)
    out = tiny.detect(batch, topk=5)
    best = full.logits.sigmoid().amax(-1).topk(5, dim=1).indices[0]
    torch.testing.assert_close(out.logits[0], full.logits[0, best])
    torch.testing.assert_close(out.queries[0], full.hs[0, best])
    torch.testing.assert_close(out.boxes[0], full.boxes[0, best])
    # no final decoder norm: the heads see the raw last layer output
    torch.testing.assert_close(full.logits, tiny.class_embed[1](full.hs))
    with pytest.raises(MfdetrError, match="topk"):
        tiny.detect(batch, topk=21)


def test_deterministic(tiny):
    batch = make_batch([(64, 128), (128, 64)])
    a, b = tiny.detect(batch, topk=8), tiny.detect(batch, topk=8)
    assert torch.equal(a.queries, b.queries) and torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.enc_maps[4], b.enc_maps[4], strict=True))


def test_batch_members_are_independent(tiny):
    """The unpadded image alone and inside a batch with a smaller, padded image."""
    a = tiny.detect(make_batch([(128, 128)], seed=3), topk=10, enc_layers=(2, 4))
    b = tiny.detect(make_batch([(128, 128), (64, 96)], seed=3), topk=10, enc_layers=(2, 4)).select([0])
    pairs = zip(
        [a.logits, a.boxes, a.queries, a.c1, *a.enc_maps[2], *a.enc_maps[4]],
        [b.logits, b.boxes, b.queries, b.c1, *b.enc_maps[2], *b.enc_maps[4]],
        strict=True,
    )
    for xa, xb in pairs:
        torch.testing.assert_close(xb, xa, atol=1e-5, rtol=1e-5)


def _run(det, canvas, *, noise: bool, seed: int = 1):
    with torch.inference_mode():
        return det.forward_levels(
            *padded_levels(VALID, canvas, 32, seed=seed, noise=noise), c1=torch.zeros(1, 8, 2, 2), enc_layers=(1, 4)
        )


def _valid_maps(out) -> list[torch.Tensor]:
    """Valid regions of the encoder maps after layers 1 and 4, all levels."""
    return [
        crop_valid(m, VALID[lvl])
        for layer in (1, 4)
        for lvl, m in enumerate(out.levels.unflatten(out.enc_memory[layer]))
    ]


def _assert_same(a, b):
    """Heads, hidden states and the valid part of the encoder memory agree (float32 round-off)."""
    for xa, xb in zip(
        [a.logits, a.boxes, a.hs, *_valid_maps(a)], [b.logits, b.boxes, b.hs, *_valid_maps(b)], strict=True
    ):
        torch.testing.assert_close(xb, xa, atol=1e-4, rtol=1e-4)


def test_padding_content_is_ignored(tiny):
    _assert_same(_run(tiny, CANVAS, noise=False), _run(tiny, CANVAS, noise=True))


def test_alone_vs_padded_whole_model(tiny):
    """Unlike DINO (query positions from valid-ratio-scaled boxes), H-DETR's query positions come from
    the unpadded-normalised selected boxes, so the whole transformer and the heads give the same
    outputs for the same content alone and inside a padded canvas."""
    alone, padded = _run(tiny, VALID, noise=False), _run(tiny, CANVAS, noise=True)
    _assert_same(alone, padded)
    torch.testing.assert_close(padded.aux["refs"][0], alone.aux["refs"][0], atol=1e-6, rtol=1e-5)


def test_proposals_scored_by_class0_of_the_extra_head():
    """Official ``topk(enc_outputs_class[..., 0])`` with ``class_embed[dec_layers]``: other classes
    and the decoder heads do not move the selection; the class-0 row does."""
    torch.manual_seed(5)
    det = build_hdetr(HDETR_CONFIGS["hdetr_tiny"][0])
    with torch.no_grad():
        for p in det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base = _run(det, CANVAS, noise=False).aux["refs"][0]
    last = det.class_embed[2]  # dec_layers = 2 → the proposal head
    with torch.no_grad():
        last.weight[1:] += torch.randn_like(last.weight[1:])
        det.class_embed[0].weight += 1.0
    torch.testing.assert_close(_run(det, CANVAS, noise=False).aux["refs"][0], base)
    with torch.no_grad():
        last.weight[0] = torch.randn_like(last.weight[0])
    assert not torch.allclose(_run(det, CANVAS, noise=False).aux["refs"][0], base)


def test_one2many_rows_unused(tiny):
    batch = make_batch([(64, 96)], seed=4)
    ref = tiny.forward_detr(batch.images, batch.pad_mask)
    w = tiny.query_embed.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[20:] = torch.randn_like(w[20:]) * 10
        assert torch.equal(tiny.forward_detr(batch.images, batch.pad_mask).logits, ref.logits)
        with torch.no_grad():
            w[0] += 1.0
        assert not torch.equal(tiny.forward_detr(batch.images, batch.pad_mask).hs[:, 0], ref.hs[:, 0])
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_query_pos_is_official_proposal_embedding(tiny):
    """``get_proposal_pos_embed``: (x, y, w, h) blocks, temperature 10000, 2π, interleaved sin/cos,
    then ``pos_trans`` → ``pos_trans_norm``, first d channels."""
    tr = tiny.transformer
    boxes = torch.rand(2, 5, 4)
    n = 16
    dim_t = 10000 ** (2 * torch.div(torch.arange(n), 2, rounding_mode="floor") / n)
    pos = boxes[..., None] * 2 * math.pi / dim_t  # [2, 5, 4, n]
    sine = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)
    expected = tr.pos_trans_norm(tr.pos_trans(sine))[..., :32]
    torch.testing.assert_close(tr.query_pos(boxes), expected)


def test_predict_official_postprocess(tiny):
    batch = make_batch([(64, 128), (96, 64)])
    dets = tiny.predict(batch)
    full = tiny.forward_detr(batch.images, batch.pad_mask)
    for b, det in enumerate(dets):
        top = full.logits[b].sigmoid().flatten().topk(50)  # hdetr_tiny num_select
        torch.testing.assert_close(det.scores, top.values)
        assert torch.equal(det.labels, top.indices % 91) and torch.equal(det.category_ids, det.labels)
        h, w = batch.orig_hw[b].tolist()
        cx, bw = full.boxes[b, top.indices // 91, 0], full.boxes[b, top.indices // 91, 2]
        torch.testing.assert_close(det.boxes[:, 0], (cx - bw / 2) * w)
    assert len(tiny.predict(batch, num_select=7)[0].scores) == 7


@pytest.mark.parametrize("levels,out_indices,dec", [(5, (0, 1, 2, 3), 3), (3, (1, 2, 3), 1), (2, (2, 3), 2)])
def test_any_size_config(levels, out_indices, dec):
    cfg = HDetrConfig(
        backbone=BackboneConfig(kind="tiny", out_indices=out_indices, params={"widths": (8, 8, 16, 16)}),
        hidden_dim=64,
        nheads=8,
        enc_layers=2,
        dec_layers=dec,
        dim_feedforward=32,
        enc_n_points=1,
        dec_n_points=3,
        num_feature_levels=levels,
        num_classes=5,
        num_queries_one2one=7,
        num_queries_one2many=3,
    )
    det = build_hdetr(cfg)
    out = det.detect(make_batch([(64, 128)]), topk=7, enc_layers=(2,))
    assert len(out.enc_maps[2]) == levels and out.logits.shape == (1, 7, 5) and out.queries.shape == (1, 7, 64)
    assert len(det.class_embed) == dec + 1 and len(det.transformer.decoder.layers) == dec
    assert det.query_embed.weight.shape == (10, 64) and det.transformer.pos_trans.in_features == 128
    assert len(det.preset.level_strides) == levels


def test_config_errors():
    with pytest.raises(MfdetrError, match="hidden_dim"):
        HDetrConfig(backbone=BackboneConfig(kind="tiny"), hidden_dim=48)
    with pytest.raises(MfdetrError, match="num_queries_one2one"):
        HDetrConfig(backbone=BackboneConfig(kind="tiny"), num_queries_one2one=0)
    with pytest.raises(MfdetrError, match="unknown HDetrConfig keys"):
        HDetrConfig.from_dict({"backbone": {"kind": "tiny"}, "num_queries": 3})
