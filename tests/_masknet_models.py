"""Tiny MaskNet configs and models over random detector outputs, for the mask-network model tests, and the
ground truth placed on given queries' boxes for the positives-only tests."""

from __future__ import annotations

import math

import torch

from mfdetr.config import apply_overrides, from_dict, to_dict
from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.masknet import MaskNet, MaskNetConfig, build_masknet
from mfdetr.masknet.complexity import paper_row_overrides
from mfdetr.masknet.targets import pred_boxes_original

D_MODEL, STRIDES = 32, (8, 16, 32, 64)
# tiny widths standing in for D = 128 / 96 / 64 and small windows / heads for tiny maps
TINY = [
    "roi_size=8",
    "image_encoder.swin_window=4",
    "box_encoder.swin_window=4",
    "mask_scoring.channels=16",
    "mask_scoring.fc_dim=16",
    "neck.groups=8",
]


def tiny_cfg(overrides: list[str] | tuple[str, ...] = ()) -> MaskNetConfig:
    """The default config at tiny widths, with a paper row's ``overrides`` (widths scaled down)."""
    ovs = [*TINY, *paper_row_overrides(overrides, d=D_MODEL, d128=16, d96=24, d64=8)]
    return from_dict(MaskNetConfig, apply_overrides(to_dict(MaskNetConfig()), ovs))


def make_det(
    *,
    b: int = 2,
    k: int = 6,
    hw: tuple[int, int] = (44, 58),
    pad: tuple[int, int] = (0, 0),
    c1_channels: int = D_MODEL,
    seed: int = 0,
    base: dict | None = None,
    map_fill: float | None = None,
) -> DetectorOutput:
    """Random detector output; ``pad`` adds canvas padding filled with garbage (must be ignored), in the
    encoder maps ``map_fill`` (e.g. NaN) when given."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    hc, wc = h + pad[0], w + pad[1]
    if base is None:
        boxes = torch.cat(
            (torch.rand(b, k, 2, generator=g) * 0.6 + 0.2, torch.rand(b, k, 2, generator=g) * 0.3 + 0.1), -1
        )
        boxes[:, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])  # touches every image border
        boxes[:, 1] = torch.tensor([0.9, 0.9, 0.2, 0.2])  # bottom-right corner
        base = {
            "queries": torch.randn(b, k, D_MODEL, generator=g),
            "boxes": boxes,
            "logits": torch.randn(b, k, 7, generator=g),
            "maps": [torch.randn(b, D_MODEL, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES],
            "c1": torch.randn(b, c1_channels, math.ceil(h / 4), math.ceil(w / 4), generator=g),
        }

    def canvas(t: torch.Tensor, stride: int, fill: float | None = None) -> torch.Tensor:
        z = torch.randn(*t.shape[:2], math.ceil(hc / stride), math.ceil(wc / stride), generator=g) * 7
        if fill is not None:
            z.fill_(fill)
        z[..., : t.shape[-2], : t.shape[-1]] = t
        return z

    return DetectorOutput(
        queries=base["queries"],
        boxes=base["boxes"],
        logits=base["logits"],
        enc_maps={4: [canvas(m, s, map_fill) for m, s in zip(base["maps"], STRIDES, strict=True)]},
        c1=canvas(base["c1"], 4),
        input_hw=torch.tensor([[h, w]] * b),
        orig_hw=torch.tensor([[2 * h, 2 * w]] * b),
        level_valid_hw=torch.tensor([[[math.ceil(h / s), math.ceil(w / s)] for s in STRIDES]] * b),
    ).validate()


def build(cfg: MaskNetConfig, c1_channels: int = D_MODEL) -> MaskNet:
    """MaskNet over a detector of width :data:`D_MODEL` with levels at :data:`STRIDES`."""
    return build_masknet(cfg, d_model=D_MODEL, level_strides=STRIDES, c1_channels=c1_channels)


K = 6


def gts_for(det: DetectorOutput, queries: list[list[int]]) -> list[GTInstances]:
    """Per image, one GT per listed query: its (clamped) predicted box, with an elliptic mask inside."""
    boxes = pred_boxes_original(det)
    out = []
    for b, qs in enumerate(queries):
        h0, w0 = (int(v) for v in det.orig_hw[b].tolist())
        yy, xx = torch.meshgrid(torch.arange(h0) + 0.5, torch.arange(w0) + 0.5, indexing="ij")
        gb, masks = [], []
        for q in qs:
            x0, y0, x1, y1 = boxes[b, q].tolist()
            x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w0), min(y1, h0)
            gb.append([x0, y0, x1, y1])
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)
        n = len(qs)
        out.append(
            GTInstances(
                boxes=torch.tensor(gb, dtype=torch.float32).reshape(n, 4),
                labels=torch.ones(n, dtype=torch.long),
                masks=torch.stack(masks) if masks else torch.zeros(0, h0, w0, dtype=torch.bool),
                iscrowd=torch.zeros(n, dtype=torch.bool),
                image_id=100 + b,
                orig_hw=(h0, w0),
            )
        )
    return out


def model64(overrides: tuple[str, ...] = ()) -> MaskNet:
    """A seeded tiny MaskNet in float64, its weights perturbed."""
    torch.manual_seed(0)
    model = build(tiny_cfg(overrides)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the zero-initialised deformable projections (all gradients non-zero)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


def det64(b: int = 2) -> DetectorOutput:
    """:func:`make_det` with :data:`K` queries, in float64."""
    return make_det(b=b, k=K).to("cpu", dtype=torch.float64)
