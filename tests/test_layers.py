"""Shared layers (``mfdetr.layers``): one implementation serving the detectors (official key names,
official formulas) and the mask network (its own names, valid-size formulas), checked against
direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mfdetr.layers import (
    FFN,
    DeformableEncoderLayer,
    PositionEmbeddingSine,
    encoder_reference_points,
    focal_class_cost,
    relative_position_bias,
    relative_position_index,
    shifted_window_regions,
    sine_pos_embed_from_sizes,
    window_partition,
    window_reverse,
)


def test_deformable_layer_key_layouts() -> None:
    official = DeformableEncoderLayer(
        dim=16, levels=2, heads=2, points=2, ffn_hidden=24, activation="relu", ffn_names="linear"
    )
    ours = DeformableEncoderLayer(dim=16, levels=2, heads=2, points=2, ffn_hidden=24)
    off_keys = [k for k in official.state_dict() if not k.startswith("self_attn.")]
    our_keys = [k for k in ours.state_dict() if not k.startswith("self_attn.")]
    assert off_keys == [
        "norm1.weight",
        "norm1.bias",
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
        "norm2.weight",
        "norm2.bias",
    ]
    assert our_keys == [
        "norm1.weight",
        "norm1.bias",
        "ffn.fc1.weight",
        "ffn.fc1.bias",
        "ffn.fc2.weight",
        "ffn.fc2.bias",
        "norm2.weight",
        "norm2.bias",
    ]
    with pytest.raises(ValueError, match="ffn_names"):
        DeformableEncoderLayer(dim=16, levels=1, heads=2, points=2, ffn_hidden=8, ffn_names="mlp")  # type: ignore[arg-type]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_deformable_layer_is_post_norm_attention_then_ffn(activation: str) -> None:
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(
        dim=16, levels=2, heads=2, points=2, ffn_hidden=24, activation=activation, ffn_names="linear"
    ).double()
    for p in layer.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    shapes = [(4, 5), (2, 3)]
    src = torch.randn(2, 26, 16, dtype=torch.float64)
    pos = torch.randn(2, 26, 16, dtype=torch.float64)
    ref = torch.rand(2, 26, 2, 2, dtype=torch.float64)
    act = torch.relu if activation == "relu" else torch.nn.functional.gelu
    x = layer.norm1(src + layer.self_attn(src + pos, ref, src, shapes))
    want = layer.norm2(x + layer.linear2(act(layer.linear1(x))))
    got = layer(src, pos, ref, shapes)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same weights under the mask network's key layout give the same result
    ours = DeformableEncoderLayer(dim=16, levels=2, heads=2, points=2, ffn_hidden=24, activation=activation).double()
    sd = {k.replace("linear1", "ffn.fc1").replace("linear2", "ffn.fc2"): v for k, v in layer.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    torch.testing.assert_close(ours(src, pos, ref, shapes), got, rtol=0, atol=0)
    # only the first tokens: the first rows of the full result
    torch.testing.assert_close(ours(src, pos, ref, shapes, num_out=20), got[:, :20], rtol=1e-12, atol=1e-12)


def test_reference_points_from_sizes_equal_the_official_ratio_formula() -> None:
    shapes = [(6, 8), (3, 4)]
    valid_wh = torch.tensor([[[8.0, 6.0], [4.0, 3.0]], [[5.0, 4.0], [3.0, 2.0]]])
    hw = torch.tensor([[6.0, 8.0], [3.0, 4.0]])
    ratios = valid_wh / hw.flip(-1)
    official = encoder_reference_points(shapes, ratios)
    ours = encoder_reference_points(shapes, ratios, valid_wh)
    assert ours.shape == (2, 6 * 8 + 3 * 4, 2, 2)
    torch.testing.assert_close(ours, official)
    # token (row 1, col 2) of level 0 in image 1: ((2 + 0.5) / 5, (1 + 0.5) / 4) times each level's ratios
    want = torch.tensor([2.5 / 5, 1.5 / 4])[None] * ratios[1]
    torch.testing.assert_close(ours[1, 1 * 8 + 2], want)


def test_sine_embedding_from_sizes_equals_the_mask_embedding_inside_the_valid_region() -> None:
    valid = torch.tensor([[5, 7], [3, 4]])
    mask = torch.ones(2, 6, 9, dtype=torch.bool)
    for b, (h, w) in enumerate(valid.tolist()):
        mask[b, :h, :w] = False
    from_mask = PositionEmbeddingSine(num_feats=8, offset=-0.5)(mask).flatten(2).transpose(1, 2)  # [B, HW, 16]
    from_sizes = sine_pos_embed_from_sizes(valid, (6, 9), 16)
    inside = ~mask.flatten(1)
    torch.testing.assert_close(from_sizes[inside], from_mask[inside], rtol=1e-6, atol=1e-6)
    # first feature of y at row 0: sin(0.5 / 5 · 2π)
    assert math.isclose(from_sizes[0, 0, 0].item(), math.sin(0.5 / 5 * 2 * math.pi), rel_tol=1e-5)


def test_window_helpers() -> None:
    x = torch.arange(2 * 6 * 9 * 3, dtype=torch.float32).view(2, 6, 9, 3)
    win = window_partition(x, 3)
    assert win.shape == (2 * 2 * 3, 9, 3)
    assert torch.equal(win[1].view(3, 3, 3), x[0, 0:3, 3:6])  # second window of image 0: rows 0-2, cols 3-5
    assert torch.equal(window_reverse(win, 3, 6, 9), x)
    idx = relative_position_index(3)
    table = torch.randn(25, 2)
    bias = relative_position_bias(table, idx)
    assert bias.shape == (2, 9, 9)
    # token 0 = (0, 0), token 5 = (1, 2): offset (-1, -2) → ((-1 + 2) · 5 + (-2 + 2))
    assert torch.equal(bias[:, 0, 5], table[5])
    regions = shifted_window_regions(6, 9, 3, 1, device=torch.device("cpu"))
    assert regions.shape == (6, 9)
    assert regions[0].unique().tolist() == [0]  # the top-left window lies in one region
    assert regions[-1].unique().tolist() == [4, 5, 7, 8]  # the bottom-right one meets four


def test_focal_class_cost() -> None:
    p = torch.tensor([0.01, 0.3, 0.5, 0.99])
    want = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p**2 * -torch.log(1 - p + 1e-8)
    torch.testing.assert_close(focal_class_cost(p), want)
    assert focal_class_cost(p)[0] > 0 > focal_class_cost(p)[-1]  # a likely class is cheap to match
    torch.testing.assert_close(
        focal_class_cost(p, alpha=0.5, gamma=0.0), 0.5 * (-torch.log(p + 1e-8) + torch.log(1 - p + 1e-8))
    )


def test_ffn() -> None:
    torch.manual_seed(0)
    f = FFN(dim=4, hidden=6, activation="relu")
    x = torch.randn(3, 4)
    torch.testing.assert_close(f(x), f.fc2(torch.relu(f.fc1(x))), rtol=0, atol=0)
    assert [k for k in f.state_dict()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("chunk", [None, 3])
def test_deformable_layer_on_a_flat_list_of_tokens_equals_those_rows_of_the_full_result(chunk: int | None) -> None:
    """``out_rows``: some tokens of each image (none of one), one flat list, no padding; with checkpoint
    chunks that straddle images. Outputs and every gradient equal the full layer's rows (float64)."""
    from mfdetr.layers.deformable import TokenRows

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(dim=16, levels=2, heads=2, points=2, ffn_hidden=24).double()
    for p in layer.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    shapes = [(4, 5), (2, 3)]
    src = torch.randn(3, 26, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 26, 16, dtype=torch.float64)
    ref = torch.rand(3, 26, 2, 2, dtype=torch.float64)
    rows = TokenRows(torch.tensor([0, 0, 0, 2, 2]), torch.tensor([1, 7, 19, 0, 4]), [3, 0, 2])
    got = layer(src, pos, ref, shapes, out_rows=rows, checkpoint_tokens=chunk)
    want = layer(src, pos, ref, shapes)[rows.batch, rows.token]
    assert got.shape == (5, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn(got.shape, dtype=torch.float64)
    inputs = [src, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert rows.chunk_counts(2, 5) == [1, 0, 2] and rows.chunk_counts(0, 3) == [3, 0, 0]
