"""Swin backbone: contract (stages, strides, norms), window attention vs a naive reference, and the
full-size state-dict layout against the official DINO / H-Deformable-DETR key manifests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mfdetr.detectors.backbones.swin import (
    SwinBlock,
    SwinConfig,
    build_swin,
    build_swin_l_dino,
    build_swin_l_hdetr,
    swin_backbone,
)
from mfdetr.errors import MfdetrError
from tests._manifests import manifest_part
from tests._backbones import randomize_
from tests._backbones import tiny_swin as tiny


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3), (2, 3)])
def test_stage_shapes_for_odd_input(out_indices):
    model = tiny(out_indices)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 53))
    assert sorted(out) == sorted(set(out_indices) | {0})
    for i, t in out.items():
        spec = model.stage_specs[i]
        assert spec.stride == 4 * 2**i and spec.channels == 16 * 2**i
        assert t.shape == (2, spec.channels, math.ceil(37 / spec.stride), math.ceil(53 / spec.stride))
        assert t.is_contiguous() and torch.isfinite(t).all()
    assert [s.channels for s in model.out_specs] == [16 * 2**i for i in out_indices]


def test_image_padding_to_patch_multiple_is_invisible():
    # The stem zero-pads right/bottom to a multiple of 4: an explicit zero pad gives the same maps.
    model = tiny()
    randomize_(model)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        a = model(x)
        b = model(F.pad(x, (0, 3, 0, 3)))
    for i in a:
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=1e-6)


def test_batch_elements_are_independent():
    model = tiny(window=3)
    randomize_(model)
    x = torch.randn(3, 3, 45, 61)
    with torch.no_grad():
        batch = model(x)
        single = model(x[1:2])
    for i in batch:
        torch.testing.assert_close(batch[i][1:2], single[i], rtol=1e-5, atol=1e-5)


def naive_window_attention(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """SW-MSA of ``blk`` on ``x [B, H, W, C]`` by full attention over the padded map with a pair mask.

    Tokens p, q (padded coordinates) attend to each other iff they fall in the same window of the
    grid shifted by ``s`` *without wrap-around*: floor((y - s) / w) and floor((x - s) / w) agree.
    Their bias is table[(dy + w - 1) * (2w - 1) + dx + w - 1].
    """
    b, h, w_, c = x.shape
    ws, s, attn = blk.window_size, blk.shift_size, blk.attn
    y = F.pad(blk.norm1(x), (0, 0, 0, (-w_) % ws, 0, (-h) % ws))
    hp, wp = y.shape[1:3]
    yy, xx = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    win_y, win_x = torch.div(yy - s, ws, rounding_mode="floor"), torch.div(xx - s, ws, rounding_mode="floor")
    allowed = (win_y[:, None] == win_y[None]) & (win_x[:, None] == win_x[None])
    dy, dx = yy[:, None] - yy[None], xx[:, None] - xx[None]
    idx = ((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1).clamp(0, (2 * ws - 1) ** 2 - 1)
    bias = attn.relative_position_bias_table[idx].permute(2, 0, 1)  # [nH, L, L]
    nh = attn.num_heads
    q, k, v = attn.qkv(y.reshape(b, hp * wp, c)).reshape(b, hp * wp, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, hp, wp, c)
    o = attn.proj(o)[:, :h, :w_]
    x = x + o
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("hw", [(7, 10), (3, 3), (2, 5)])
def test_block_matches_naive_shifted_window_attention(shift, hw):
    stage = tiny(window=3, depths=(2, 1, 2, 1)).layers[0]
    randomize_(stage)
    blk = stage.blocks[shift]
    assert blk.shift_size == shift
    x = torch.randn(2, *hw, 16)
    from mfdetr.detectors.backbones.swin import shifted_window_mask

    h, w = hw
    mask = shifted_window_mask(h + (-h) % 3, w + (-w) % 3, 3, 1, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        got = blk(x, mask)
        ref = naive_window_attention(blk, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_relative_position_index_buffer():
    model = tiny(window=3)
    sd = model.state_dict()
    idx = sd["layers.0.blocks.0.attn.relative_position_index"]
    assert idx.dtype == torch.int64 and idx.shape == (9, 9)
    assert idx.min() == 0 and idx.max() == 24 and idx[0, 8] == 0 and idx[8, 0] == 24
    assert (idx.diagonal() == 12).all()  # dy = dx = 0 → centre of the 5x5 table


def test_bad_configs_raise_clear_errors():
    with pytest.raises(MfdetrError, match="out_indices"):
        tiny(out_indices=(2, 1))
    with pytest.raises(MfdetrError, match="divisible"):
        build_swin(SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(3, 2, 2, 4), window_size=3))
    with pytest.raises(TypeError):
        swin_backbone(out_indices=(1, 2, 3), windw_size=3)


def test_factory_builder_accepts_toml_lists():
    model = swin_backbone(
        out_indices=[1, 2, 3], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=3
    )
    assert model.out_indices == (1, 2, 3) and model.stage_specs[3].channels == 128


@pytest.mark.parametrize(
    ("manifest", "prefix", "build"),
    [
        ("dino_swinl_5scale", "backbone.0.", lambda: build_swin_l_dino((0, 1, 2, 3))),
        ("dino_swinl_4scale", "backbone.0.", lambda: build_swin_l_dino((1, 2, 3))),
        ("hdetr_swinl", "backbone.0.body.", build_swin_l_hdetr),
    ],
)
def test_full_size_state_dict_matches_official_manifest(manifest, prefix, build):
    with torch.device("meta"):
        model = build()
    ours = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    official = manifest_part(manifest, prefix)
    assert len(official) > 300
    assert ours == official


def test_patch_merging_pads_odd_maps_and_keeps_official_neighbour_order():
    merge = tiny().layers[0].downsample
    seen = {}
    merge.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    x = torch.randn(1, 5, 7, 16)
    with torch.no_grad():
        out = merge(x)
    assert out.shape == (1, 3, 4, 32)
    cat = seen["x"]
    xp = F.pad(x, (0, 0, 0, 1, 0, 1))
    # official order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
    for j, (r, c) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        torch.testing.assert_close(cat[..., 16 * j : 16 * (j + 1)], xp[:, r::2, c::2], rtol=0, atol=0)
    assert (cat[0, 2, :, 16:32] == 0).all()  # padded bottom row
