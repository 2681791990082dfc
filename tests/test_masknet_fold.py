"""The folded linear maps on the stride-4 grid: the neck computed as one per-image affine map of C1
(``Neck.mapped``), and MaskNet applying the box encoder's channel mapper to E_1 before its upsampling
and inside the neck, give the outputs and gradients of the steps taken one by one (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _masknet_models import det64, model64
from mfdetr.masknet.blocks import masked_fill_outside
from mfdetr.masknet.neck import Neck


def _neck64(groups: int = 4) -> Neck:
    torch.manual_seed(0)
    neck = Neck(in_channels=12, dim=16, groups=groups).double()
    with torch.no_grad():
        neck.norm.weight.normal_()
        neck.norm.bias.normal_()
    return neck


def test_folded_neck_equals_group_norm_of_each_valid_region() -> None:
    """Against torch's own GroupNorm on each image's valid crop: a full image, a padded one, one pixel."""
    neck = _neck64()
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[9, 11], [5, 7], [1, 1]])
    c1 = masked_fill_outside(torch.randn(3, 12, 9, 11, generator=g, dtype=torch.float64) * 3 + 1, valid)
    with torch.no_grad():
        out = neck.mapped(c1, valid)
    for i, (h, w) in enumerate(valid.tolist()):
        ref = F.group_norm(neck.proj(c1[i : i + 1, :, :h, :w]), 4, neck.norm.weight, neck.norm.bias, neck.norm.eps)
        assert torch.allclose(out[i : i + 1, :, :h, :w], ref, atol=1e-12, rtol=0)
        assert float(out[i, :, h:].abs().sum() + out[i, :, :, w:].abs().sum()) == 0.0  # zero outside


def test_folded_neck_and_mapper_equal_the_steps_with_their_gradients() -> None:
    neck = _neck64()
    g = torch.Generator().manual_seed(1)
    valid = torch.tensor([[9, 11], [4, 6]])
    c1 = masked_fill_outside(torch.randn(2, 12, 9, 11, generator=g, dtype=torch.float64), valid)
    c1.requires_grad_(True)
    weight = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.einsum("dc,bchw->bdhw", weight, neck(c1, valid))  # the masked GroupNorm module, then the map
    out = neck.mapped(c1, valid, weight)
    assert out.shape == (2, 5, 9, 11)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = [c1, weight, *neck.parameters()]
    for a, b in zip(torch.autograd.grad(ref, inputs, grad), torch.autograd.grad(out, inputs, grad), strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_folded_neck_keeps_its_statistics_in_float32_under_autocast() -> None:
    neck = _neck64().float()
    valid = torch.tensor([[9, 11]])
    c1 = torch.randn(1, 12, 9, 11) * 50 + 300  # a large mean: statistics in bfloat16 would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck.mapped(c1.bfloat16(), valid)
    ref = neck(c1, valid)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())


@pytest.mark.parametrize(
    "overrides", [(), ("fuse_c1=false", "neck.enabled=false"), ("box_encoder.dim=32",)]
)  # no mapper at D = d
def test_masknet_with_folded_maps_equals_the_steps_one_by_one(overrides: tuple[str, ...]) -> None:
    model = model64(overrides)
    det = det64()
    outs, grads = [], []
    for fold in (True, False):
        model.fold_linear_maps = fold
        model.zero_grad()
        out = model(det)
        (out.mask_logits.square().sum() + out.iou_pred.sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outs[0].mask_logits, outs[1].mask_logits, atol=1e-10, rtol=0)
    assert torch.allclose(outs[0].iou_pred, outs[1].iou_pred, atol=1e-10, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-9, rtol=0), name


def test_one_query_attention_folds_its_key_and_value_projections() -> None:
    from mfdetr.masknet.blocks import Attention

    torch.manual_seed(0)
    att = Attention(q_dim=16, kv_dim=8, heads=4).double()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 1, 16, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(5, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref, out = att(q, kv), att(q, kv, fold=True)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = [q, kv, *att.parameters()]
    for a, b in zip(torch.autograd.grad(ref, inputs, grad), torch.autograd.grad(out, inputs, grad), strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
