"""The image encoder's last layer on the E_1 tokens RoIAlign reads (mfdetr.masknet.box_encoder.roi_support):
cells outside the support never reach a RoI feature or its gradient, and MaskNet's outputs and parameter
gradients for a selection of queries equal the all-queries computation's (float64) while the last deformable
layer updates fewer tokens."""

from __future__ import annotations

import math

import pytest
import torch

from mfdetr.config import apply_overrides, from_dict, to_dict
from mfdetr.contracts import DetectorOutput
from mfdetr.masknet import MaskNetConfig, build_masknet
from mfdetr.masknet.box_encoder import roi_support

D = 16


def small_boxes(n: int, g: torch.Generator, spill: float = 0.05) -> torch.Tensor:
    """[n, 4] normalised cxcywh: small boxes anywhere, some over the image border, one degenerate;
    centres up to ``spill`` outside the image."""
    c = torch.rand(n, 2, generator=g) * (1 + 2 * spill) - spill
    wh = torch.rand(n, 2, generator=g) * 0.2 + 0.01
    wh[0] = 0.0
    return torch.cat((c, wh), 1)


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_cells_outside_the_support_reach_no_roi_feature(stride: int) -> None:
    g = torch.Generator().manual_seed(stride)
    cfg = from_dict(
        MaskNetConfig,
        apply_overrides(
            to_dict(MaskNetConfig()),
            ["roi_size=7", "neck.groups=4", "box_encoder.layers=0", f"box_encoder.dim={D}", "image_encoder.layers=0"],
        ),
    )
    model = build_masknet(cfg, d_model=D, level_strides=(stride, 2 * stride), c1_channels=D).double()
    input_hw = torch.tensor([[90, 131], [77, 120]])
    grid = (math.ceil(100 / stride), math.ceil(140 / stride))  # a canvas with padding
    boxes = small_boxes(10, g).double()
    bi = torch.tensor([0, 1] * 5)
    keep = roi_support(boxes, bi, input_hw, grid, stride, 2)
    assert keep.shape == (2, *grid) and keep.any() and not keep.all()

    def rois(e1: torch.Tensor) -> torch.Tensor:
        f = model._upsample_to(e1, (25, 35))
        return model.box_encoder.roi_align(f, boxes, input_hw, bi)

    e1 = torch.randn(2, D, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    ref = rois(e1)
    noise = torch.randn(e1.shape, generator=g, dtype=torch.float64) * 100
    moved = rois(torch.where(keep[:, None], e1, noise))
    assert torch.equal(ref, moved)  # bit for bit: the cells outside weigh exactly zero
    ref.backward(torch.randn(ref.shape, generator=g, dtype=torch.float64))
    assert e1.grad is not None
    assert float(e1.grad.masked_select(~keep[:, None]).abs().max()) == 0.0
    assert float(e1.grad.masked_select(keep[:, None]).abs().max()) > 0.0


def det64(g: torch.Generator, strides: tuple[int, ...], b: int = 2, k: int = 8) -> DetectorOutput:
    h, w = 96, 128
    maps = [torch.randn(b, D, math.ceil(h / s), math.ceil(w / s), generator=g) for s in strides]
    boxes = torch.stack([small_boxes(k, g, spill=0.0) for _ in range(b)])
    return (
        DetectorOutput(
            queries=torch.randn(b, k, D, generator=g),
            boxes=boxes.float(),
            logits=torch.randn(b, k, 5, generator=g),
            enc_maps={1: maps},
            c1=torch.randn(b, D, h // 4, w // 4, generator=g),
            input_hw=torch.tensor([[h, w], [80, 100]]),
            orig_hw=torch.tensor([[h, w], [80, 100]]),
            level_valid_hw=torch.tensor(
                [
                    [[math.ceil(h / s), math.ceil(w / s)] for s in strides],
                    [[math.ceil(80 / s), math.ceil(100 / s)] for s in strides],
                ]
            ),
        )
        .validate()
        .to("cpu", dtype=torch.float64)
    )


@pytest.mark.parametrize("strides,layers", [((4, 8, 16), 2), ((8, 16, 32, 64), 1)], ids=["stride4-2layers", "stride8"])
def test_selected_queries_equal_all_queries_with_fewer_tokens(strides: tuple[int, ...], layers: int) -> None:
    g = torch.Generator().manual_seed(len(strides))
    cfg = from_dict(
        MaskNetConfig,
        apply_overrides(
            to_dict(MaskNetConfig()),
            [
                "num_queries=8",
                "enc_layer=1",
                "roi_size=6",
                "neck.groups=4",
                f"image_encoder.layers={layers}",
                "image_encoder.heads=4",
                "box_encoder.layers=1",
                "box_encoder.dim=8",
                "box_encoder.heads=2",
                "query_encoder.heads=4",
                "mask_scoring.channels=8",
                "mask_scoring.fc_dim=8",
            ],
        ),
    )
    torch.manual_seed(0)
    model = build_masknet(cfg, d_model=D, level_strides=strides, c1_channels=D).double()
    with torch.no_grad():  # away from the zero-initialised deformable projections
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    det = det64(g, strides)
    select = (torch.tensor([0, 0, 1]), torch.tensor([1, 5, 2]))
    weight = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)

    def step(selected: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(det, select=select) if selected else model(det).select(*select)
        assert out.iou_pred is not None
        ((out.mask_logits * weight).sum() + out.iou_pred.sum()).backward()
        return out.mask_logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    seen: list[int] = []
    last = model.image_encoder.layers[-1]
    hook = last.register_forward_hook(lambda m, a, out: seen.append(int(out.shape[1])))
    full_logits, full_grads = step(False)
    sel_logits, sel_grads = step(True)
    hook.remove()
    n1 = math.ceil(96 / strides[0]) * math.ceil(128 / strides[0])
    assert seen[0] == n1 and seen[1] < n1 // 2  # the last layer updated fewer than half of E_1's tokens
    assert float((full_logits - sel_logits).abs().max()) <= 1e-10
    for n, gr in full_grads.items():
        assert float((gr - sel_grads[n]).abs().max()) <= 1e-10, n
    assert float(full_grads["image_encoder.layers.0.ffn.fc1.weight"].abs().max()) > 0


def saved_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the bytes of the tensors autograd keeps for its backward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_checkpointed_layers_give_the_same_step_and_keep_less() -> None:
    g = torch.Generator().manual_seed(11)
    strides = (4, 8, 16)
    sets = [
        "num_queries=8",
        "enc_layer=1",
        "roi_size=8",
        "neck.groups=4",
        "image_encoder.layers=2",
        "image_encoder.heads=4",
        "box_encoder.layers=2",
        "box_encoder.dim=8",
        "box_encoder.heads=2",
        "query_encoder.heads=4",
        "mask_scoring.channels=8",
        "mask_scoring.fc_dim=8",
    ]
    det = det64(g, strides)
    select = (torch.tensor([0, 1, 1]), torch.tensor([3, 0, 6]))
    results = []
    for chunk in (0, 100):
        cfg = from_dict(MaskNetConfig, apply_overrides(to_dict(MaskNetConfig()), [*sets, f"checkpoint_tokens={chunk}"]))
        torch.manual_seed(0)
        model = build_masknet(cfg, d_model=D, level_strides=strides, c1_channels=D).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 0.05)
        for sel in (None, select):
            out, kept = saved_bytes(lambda: model(det, select=sel))
            model.zero_grad(set_to_none=True)
            (out.mask_logits.square().mean() + out.iou_pred.sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results.append((chunk, sel is None, out.mask_logits.detach(), grads, kept))
    for (_, _, logits0, grads0, kept0), (_, _, logits1, grads1, kept1) in zip(results[:2], results[2:], strict=True):
        assert float((logits0 - logits1).abs().max()) <= 1e-12
        for n in grads0:
            assert float((grads0[n] - grads1[n]).abs().max()) <= 1e-12, n
        assert kept1 < 0.6 * kept0, (kept1, kept0)


def test_checkpoint_tokens_is_validated() -> None:
    from mfdetr.errors import MfdetrError

    cfg = from_dict(MaskNetConfig, apply_overrides(to_dict(MaskNetConfig()), ["checkpoint_tokens=-1"]))
    with pytest.raises(MfdetrError, match="checkpoint_tokens must be ≥ 0"):
        build_masknet(cfg, d_model=D, level_strides=(4, 8), c1_channels=D)
