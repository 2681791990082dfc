"""FocalNet backbone: contract (stages, strides, norms), focal modulation and post-LN block vs their
formulas, and the full-size state-dict layout against the official FocalNet-DINO key manifest."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mfdetr.detectors.backbones.focalnet import (
    build_focalnet_l_fl4,
    focalnet_backbone,
)
from mfdetr.errors import MfdetrError
from tests._manifests import manifest_part
from tests._backbones import randomize_
from tests._backbones import tiny_focalnet as tiny


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3), (3,)])
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


def test_image_padding_to_patch_multiple_is_invisible():
    # The stem zero-pads right/bottom to a multiple of 4 before its 7x7 conv: explicit pad = same maps.
    model = tiny()
    randomize_(model)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        a = model(x)
        b = model(F.pad(x, (0, 3, 0, 3)))
    for i in a:
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=1e-5)


def test_downsample_pads_odd_maps_before_strided_conv():
    down = tiny().layers[0].downsample
    randomize_(down)
    x = torch.randn(1, 16, 5, 7)
    with torch.no_grad():
        got = down(x)
        ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.proj.weight, down.proj.bias, stride=2, padding=1)
        ref = down.norm(ref.permute(0, 2, 3, 1))
    assert got.shape == (1, 3, 4, 32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_batch_elements_are_independent():
    model = tiny()
    randomize_(model)
    x = torch.randn(3, 3, 45, 61)
    with torch.no_grad():
        batch = model(x)
        single = model(x[1:2])
    for i in batch:
        torch.testing.assert_close(batch[i][1:2], single[i], rtol=1e-5, atol=1e-5)


def reference_modulation(mod, x: torch.Tensor, levels: int, kernels: list[int]) -> torch.Tensor:
    """FocalNet modulation written out: q, ctx, gates = f(x); ctx_l = GELU(dwconv_l(ctx_{l-1}));
    m = (Σ_l gate_l ctx_l + gate_L GELU(mean ctx_L)) / (L + 1); out = proj(q ⊙ h(m))."""
    c = x.shape[-1]
    y = x @ mod.f.weight.T + mod.f.bias
    q, ctx, gates = y[..., :c], y[..., c : 2 * c], y[..., 2 * c :]
    ctx = ctx.permute(0, 3, 1, 2)
    total = 0
    for level in range(levels):
        w = mod.focal_layers[level][0].weight
        assert w.shape[-1] == kernels[level]
        ctx = F.gelu(F.conv2d(ctx, w, padding=kernels[level] // 2, groups=c))
        total = total + ctx * gates[..., level][:, None]
    total = total + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[..., levels][:, None]
    total = total / (levels + 1)
    hm = F.conv2d(total, mod.h.weight, mod.h.bias).permute(0, 2, 3, 1)
    return (q * hm) @ mod.proj.weight.T + mod.proj.bias


def test_modulation_and_postln_block_match_their_formulas():
    model = tiny(focal_levels=4, focal_windows=3)
    randomize_(model)
    blk = model.layers[1].blocks[0]
    x = torch.randn(2, 6, 9, 32)
    with torch.no_grad():
        m = reference_modulation(blk.modulation, x, 4, [3, 5, 7, 9])
        torch.testing.assert_close(blk.modulation(x), m, rtol=1e-5, atol=1e-5)
        ref = x + blk.gamma_1 * blk.norm1(m)
        ref = ref + blk.gamma_2 * blk.norm2(blk.mlp(ref))
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_pre_ln_block_without_layerscale():
    model = tiny(use_postln=False, use_layerscale=False)
    randomize_(model)
    blk = model.layers[0].blocks[0]
    assert blk.gamma_1 is None and "gamma_1" not in blk.state_dict()
    x = torch.randn(1, 4, 5, 16)
    with torch.no_grad():
        ref = x + blk.modulation(blk.norm1(x))
        ref = ref + blk.mlp(blk.norm2(ref))
        torch.testing.assert_close(blk(x), ref, rtol=1e-6, atol=1e-6)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(MfdetrError, match="out_indices"):
        tiny(out_indices=())
    with pytest.raises(MfdetrError, match="focal_levels"):
        tiny(focal_levels=(2, 2))
    with pytest.raises(MfdetrError, match="patch size"):
        tiny(patch_size=2)
    with pytest.raises(TypeError):
        focalnet_backbone(out_indices=(1, 2, 3), focal_level=3)


def test_factory_builder_accepts_toml_lists():
    model = focalnet_backbone(out_indices=[0, 1, 2, 3], embed_dim=16, depths=[1, 1, 2, 1], focal_levels=[2, 2, 3, 3])
    assert model.out_indices == (0, 1, 2, 3)
    assert len(model.layers[3].blocks[0].modulation.focal_layers) == 3


def test_full_size_state_dict_matches_official_manifest():
    with torch.device("meta"):
        model = build_focalnet_l_fl4((0, 1, 2, 3))
    ours = [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]
    official = manifest_part("dino_focalnet_l_5scale", "backbone.0.")
    assert len(official) > 400
    assert ours == official
    # fl4: depthwise kernels 3, 5, 7, 9 (2k + 3) and gates = levels + 1 = 5 extra outputs of f
    assert [w for k, w, _ in official if k.startswith("layers.0.blocks.0.modulation.focal_layers")] == [
        (192, 1, 3, 3),
        (192, 1, 5, 5),
        (192, 1, 7, 7),
        (192, 1, 9, 9),
    ]
    assert model.layers[0].blocks[0].modulation.f.out_features == 2 * 192 + 5
