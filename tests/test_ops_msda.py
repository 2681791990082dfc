"""Multi-scale deformable attention: fast path vs the direct reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from mfdetr.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference


def _inputs(dtype=torch.float64, bsz=2, nq=7, heads=2, dh=5, points=3, shapes=((6, 8), (3, 4), (2, 1))):
    ss = torch.tensor(shapes, dtype=torch.long)
    s = int((ss[:, 0] * ss[:, 1]).sum())
    value = torch.randn(bsz, s, heads, dh, dtype=dtype, requires_grad=True)
    # includes points outside [0, 1] on purpose (zero padding)
    loc = (torch.rand(bsz, nq, heads, len(shapes), points, 2, dtype=dtype) * 1.6 - 0.3).requires_grad_()
    w = torch.rand(bsz, nq, heads, len(shapes), points, dtype=dtype).softmax(-1).requires_grad_()
    return value, ss, loc, w


def test_forward_matches_reference_with_outside_points():
    value, ss, loc, w = _inputs()
    assert bool(((loc < 0) | (loc > 1)).any())
    a = ms_deform_attn(value, ss, loc, w)
    b = ms_deform_attn_reference(value, ss, loc, w)
    assert a.shape == (2, 7, 10)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_backward_matches_reference():
    value, ss, loc, w = _inputs()
    g = torch.randn(2, 7, 10, dtype=torch.float64)
    grads = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        out = fn(value, ss, loc, w)
        grads.append(torch.autograd.grad((out * g).sum(), (value, loc, w)))
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-9)


def test_gradcheck_fast_path():
    value, ss, loc, w = _inputs(bsz=1, nq=3, heads=1, dh=2, points=2, shapes=((3, 4), (2, 2)))
    # keep points away from integer pixel boundaries where bilinear is not differentiable
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, ss, l, a), (value, loc, w))


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_backward_with_only_some_inputs_needing_grad(needs):
    value, ss, loc, w = _inputs()
    ins = [t.detach().requires_grad_(n) for t, n in zip((value, loc, w), needs, strict=True)]
    g = torch.randn(2, 7, 10, dtype=torch.float64)
    wanted = [t for t in ins if t.requires_grad]
    got = torch.autograd.grad((ms_deform_attn(ins[0], ss, ins[1], ins[2]) * g).sum(), wanted)
    ref = torch.autograd.grad((ms_deform_attn_reference(ins[0], ss, ins[1], ins[2]) * g).sum(), wanted)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_graph_keeps_per_point_samples_only_when_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``KEEP_SAMPLES_BYTES`` the backward samples again: what autograd keeps for the op is about the
    size of its inputs, not the [B·H, Dh, Q, L, P] samples (Dh·P·L times the output). Below it the samples
    are kept; both give the same gradients."""
    import importlib

    msda = importlib.import_module("mfdetr.ops.ms_deform_attn")
    value, ss, loc, w = _inputs(dtype=torch.float64, nq=50, heads=2, dh=16, points=4)
    samples = 2 * 50 * 2 * 3 * 4 * 16  # B·Q·H·L·P·Dh
    grads, sizes = [], []
    for limit in (samples * 8 - 1, samples * 8):  # bytes of the float64 samples
        monkeypatch.setattr(msda, "KEEP_SAMPLES_BYTES", limit)
        kept: list[int] = []

        def pack(t):
            kept.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ms_deform_attn(value, ss, loc, w)
        sizes.append(sum(kept))
        grads.append(torch.autograd.grad(out, [value, loc, w], torch.ones_like(out)))
    assert sizes[0] < samples / 2 and sizes[1] > samples
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_no_grad_and_grad_paths_agree():
    value, ss, loc, w = _inputs()
    with torch.no_grad():
        a = ms_deform_attn(value, ss, loc, w)
    b = ms_deform_attn(value, ss, loc, w)
    assert torch.equal(a, b)


def test_points_far_outside_give_zero():
    value, ss, loc, w = _inputs()
    out = ms_deform_attn(value, ss, loc.detach() + 5.0, w)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_shapes_and_padding_ignored(ref_dim):
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2).double()
    ss = torch.tensor([[4, 5], [2, 3]])
    s = int((ss[:, 0] * ss[:, 1]).sum())
    x = torch.randn(1, s, 16, dtype=torch.float64)
    q = torch.randn(1, 6, 16, dtype=torch.float64)
    ref = torch.rand(1, 6, 2, ref_dim, dtype=torch.float64) * 0.5 + 0.25
    pad = torch.zeros(1, s, dtype=torch.bool)
    pad[0, -3:] = True
    out = m(q, ref, x, ss, None, pad)
    x2 = x.clone()
    x2[0, -3:] = 1e3  # padded tokens must not matter
    out2 = m(q, ref, x2, ss, None, pad)
    assert out.shape == (1, 6, 16)
    torch.testing.assert_close(out, out2)


def test_grouped_queries_equal_the_batched_op_per_image():
    """Queries of several images in one flat list (counts per image, one image with none)."""
    from mfdetr.ops.ms_deform_attn import ms_deform_attn_grouped

    value, ss, loc, w = _inputs(bsz=3)
    counts = [4, 0, 6]
    flat_loc = torch.cat([loc[0, :4], loc[2, :6]])[None]
    flat_w = torch.cat([w[0, :4], w[2, :6]])[None]
    got = ms_deform_attn_grouped(value, ss, flat_loc, flat_w, counts)
    full = ms_deform_attn(value, ss, loc, w)
    want = torch.cat([full[0, :4], full[2, :6]])[None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn(got.shape, dtype=got.dtype)
    ga = torch.autograd.grad(got, [value, loc, w], g)
    gb = torch.autograd.grad(want, [value, loc, w], g)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="counts"):
        ms_deform_attn_grouped(value, ss, flat_loc, flat_w, [4, 6])
