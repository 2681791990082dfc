"""#params▲ and #FLOPs▲ of a mask network, per component, like the paper's tables.

- #params▲: trainable parameters of the MaskNet (the detector is frozen and adds none).
- #FLOPs▲: counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one synthetic image of
  the detector's typical input size with K queries. That counter counts **2 FLOPs per multiply-add**
  of matmuls, convolutions and attention (SDPA) and does not count ``grid_sample`` (the deformable
  sampling), RoIAlign, interpolation, normalisation or element-wise ops. The paper's #FLOPs▲ appear
  to count multiply-adds (fvcore convention; e.g. Table 3: 69.7 G per 256-d box-encoder layer ≈
  682 k MACs/token × 100 RoIs × 1024 tokens), so compare its numbers with our **GMACs = FLOPs / 2**.

Detector metadata enters as a :class:`FeatureSpec` (d, level strides, C1 channels, input size); the
CLI fills it from the detector registry or from explicit values, never importing detectors here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mfdetr.contracts import DetectorOutput
from mfdetr.masknet.model import MaskNet

COMPONENTS = ("neck", "image_encoder", "box_encoder", "query_encoder", "mask_head", "mask_scoring")


@dataclass(frozen=True)
class FeatureSpec:
    """What the mask network needs to know of a detector (from its preset or the cache manifest).

    Args:
        d_model: width d of queries and encoder maps.
        level_strides: stride of each encoder level, highest resolution first.
        c1_channels: channels of the stride-4 backbone map C1.
        input_hw: the typical network-input size (h, w) used to count FLOPs.
        num_classes: class-logit width (irrelevant to the counts; for the synthetic output).
    """

    d_model: int
    level_strides: tuple[int, ...]
    c1_channels: int
    input_hw: tuple[int, int] = (800, 1200)
    num_classes: int = 91


# Used by ``mfdetr describe`` only when the detector registry does not know the name.
BUILTIN_SPECS: dict[str, FeatureSpec] = {
    "hdetr_r50": FeatureSpec(d_model=256, level_strides=(8, 16, 32, 64), c1_channels=256),
    "hdetr_swinl": FeatureSpec(d_model=256, level_strides=(8, 16, 32, 64), c1_channels=192),
    "dino_focal": FeatureSpec(d_model=256, level_strides=(4, 8, 16, 32, 64), c1_channels=192),
}


def synthetic_detector_output(
    spec: FeatureSpec, *, num_queries: int = 100, enc_layer: int = 4, batch_size: int = 1, seed: int = 0
) -> DetectorOutput:
    """A random, valid :class:`DetectorOutput` with the shapes a detector of ``spec`` produces."""
    g = torch.Generator().manual_seed(seed)
    h, w = spec.input_hw
    b, k, d = batch_size, num_queries, spec.d_model
    maps = [torch.randn(b, d, math.ceil(h / s), math.ceil(w / s), generator=g) for s in spec.level_strides]
    cxcy = torch.rand(b, k, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(b, k, 2, generator=g) * 0.35 + 0.05
    return DetectorOutput(
        queries=torch.randn(b, k, d, generator=g),
        boxes=torch.cat((cxcy, wh), -1),
        logits=torch.randn(b, k, spec.num_classes, generator=g),
        enc_maps={enc_layer: maps},
        c1=torch.randn(b, spec.c1_channels, math.ceil(h / 4), math.ceil(w / 4), generator=g),
        input_hw=torch.tensor([[h, w]] * b),
        orig_hw=torch.tensor([[h, w]] * b),
        level_valid_hw=torch.tensor([[[math.ceil(h / s), math.ceil(w / s)] for s in spec.level_strides]] * b),
    )


def count_params(model: nn.Module, *, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def params_by_component(model: MaskNet) -> dict[str, int]:
    """Trainable parameters of each component (absent ones: 0) and ``total``."""
    out = {}
    for name in COMPONENTS:
        mod = getattr(model, name, None)
        out[name] = count_params(mod) if isinstance(mod, nn.Module) else 0
    out["total"] = count_params(model)
    return out


def _cpu_flash_sdpa_flop(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: object, **kwargs: object
) -> int:
    return int(sdpa_flop_count(query, key, value))


# torch's counter has no formula for the CPU flash-attention kernel that 4-D SDPA dispatches to on CPU
# (the math fallback and the CUDA kernels are counted): count it like the CUDA flash kernel.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa_flop}


def flops_by_component(model: MaskNet, det: DetectorOutput) -> dict[str, int]:
    """FLOPs (torch's counter: 2·MACs of matmul/conv) of one forward, per component, ``other``
    (ops in MaskNet.forward itself, e.g. the non-RoI dot product) and ``total``."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    # no autograd at all: torch's module tracker trips over views of parameters made under no_grad
    model.eval().requires_grad_(False)
    fold, model.fold_linear_maps = model.fold_linear_maps, False  # each step where the paper counts it
    try:
        counter = FlopCounterMode(display=False, depth=None, custom_mapping=_CUSTOM_FLOPS)
        with torch.no_grad(), counter as fc:
            model(det)
    finally:
        model.fold_linear_maps = fold
        model.train(was_training)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    counts = fc.get_flop_counts()
    root = type(model).__name__
    out = {}
    for name in COMPONENTS:
        out[name] = int(sum(counts.get(f"{root}.{name}", {}).values()))
    total = int(fc.get_total_flops())
    out["other"] = total - sum(out.values())
    out["total"] = total
    return out


@dataclass
class ComplexityReport:
    """#params▲ and FLOPs per component for one image with K queries."""

    params: dict[str, int]
    flops: dict[str, int]
    spec: FeatureSpec
    num_queries: int
    roi_size: int
    notes: list[str] = field(default_factory=list)

    def format(self, title: str = "MaskNet") -> str:
        h, w = self.spec.input_hw
        lines = [
            f"{title}: d={self.spec.d_model}, level strides {'/'.join(map(str, self.spec.level_strides))}, "
            f"C1 {self.spec.c1_channels} ch, input {h}x{w}, K={self.num_queries}, S={self.roi_size}",
            f"{'component':<15}{'#params▲':>12}{'(M)':>8}{'GFLOPs':>10}{'GMACs':>10}",
        ]
        rows = [*COMPONENTS, "other", "total"]
        for name in rows:
            p = self.params.get(name)
            f = self.flops.get(name, 0)
            if name == "other" and not f:
                continue
            ps = f"{p:>12,}{p / 1e6:>8.2f}" if p is not None else f"{'':>12}{'':>8}"
            lines.append(f"{name:<15}{ps}{f / 1e9:>10.2f}{f / 2e9:>10.2f}")
        lines.append(
            "FLOPs: torch.utils.flop_counter.FlopCounterMode, 2 per multiply-add of matmul/conv/attention; "
            "grid_sample (deformable sampling), RoIAlign, interpolation, norms and element-wise ops "
            "are not counted. The paper's #FLOPs▲ appear to be multiply-adds: compare with GMACs."
        )
        lines.extend(self.notes)
        return "\n".join(lines)


def describe(
    model: MaskNet,
    spec: FeatureSpec,
    *,
    num_queries: int = 100,
    enc_layer: int | None = None,
    device: str | torch.device = "cpu",
) -> ComplexityReport:
    """Count #params▲ and FLOPs of ``model`` for one image of ``spec.input_hw`` with ``num_queries``
    queries (the forward runs on ``device``; the counts do not depend on it)."""
    det = synthetic_detector_output(
        spec, num_queries=num_queries, enc_layer=model.enc_layer if enc_layer is None else enc_layer
    ).to(device)
    model.to(device)
    k = min(num_queries, model.num_queries)
    return ComplexityReport(
        params=params_by_component(model),
        flops=flops_by_component(model, det),
        spec=spec,
        num_queries=k,
        roi_size=model.roi_size,
    )


def parse_levels(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"8/16/32/64"`` or ``"8,16,32,64"`` → (8, 16, 32, 64)."""
    from mfdetr.errors import MfdetrError

    parts = list(text) if not isinstance(text, str) else [p for p in text.replace(",", "/").split("/") if p.strip()]
    try:
        levels = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise MfdetrError(f"levels {text!r} must be positive integer strides, e.g. 8/16/32/64") from None
    if not levels or min(levels) < 1:
        raise MfdetrError(f"levels {text!r} must be positive integer strides, e.g. 8/16/32/64")
    return levels


def resolve_feature_spec(
    *,
    preset: FeatureSpec | None = None,
    name: str | None = None,
    d_model: int | None = None,
    levels: Sequence[int] | None = None,
    c1_channels: int | None = None,
    input_hw: tuple[int, int] | None = None,
) -> tuple[FeatureSpec, str]:
    """The :class:`FeatureSpec` to count with, and where it came from.

    ``preset`` (from the detector registry) wins over the built-in table entry ``name``; explicit
    values override either. With neither, all of ``d_model``, ``levels``, ``c1_channels`` must be given.
    """
    from mfdetr.errors import MfdetrError

    source = "explicit values"
    base = preset
    if base is not None:
        source = f"detector preset {name}"
    elif name is not None:
        if name not in BUILTIN_SPECS:
            raise MfdetrError(
                f"unknown detector {name!r}: not registered and not in the built-in table "
                f"({', '.join(sorted(BUILTIN_SPECS))}); give --d, --levels and --c1-channels"
            )
        base = BUILTIN_SPECS[name]
        source = f"{name} (built-in table)"
    if base is None:
        given = (("--d", d_model), ("--levels", levels), ("--c1-channels", c1_channels))
        missing = [n for n, v in given if v is None]
        if missing:
            raise MfdetrError(
                f"give --detector NAME or all of --d, --levels, --c1-channels (missing {', '.join(missing)})"
            )
        base = FeatureSpec(
            d_model=int(d_model or 0), level_strides=tuple(levels or ()), c1_channels=int(c1_channels or 0)
        )
    spec = FeatureSpec(
        d_model=base.d_model if d_model is None else int(d_model),
        level_strides=base.level_strides if levels is None else tuple(int(s) for s in levels),
        c1_channels=base.c1_channels if c1_channels is None else int(c1_channels),
        input_hw=base.input_hw if input_hw is None else input_hw,
        num_classes=base.num_classes,
    )
    if spec.d_model < 1 or spec.c1_channels < 1 or not spec.level_strides or min(spec.level_strides) < 1:
        raise MfdetrError(
            f"invalid detector features: d={spec.d_model}, levels={spec.level_strides}, C1={spec.c1_channels}"
        )
    return spec, source


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1200"`` → (800, 1200) (height × width)."""
    from mfdetr.errors import MfdetrError

    parts = text.lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise MfdetrError(f"input size {text!r} must look like HxW, e.g. 800x1200") from None
    if h < 1 or w < 1:
        raise MfdetrError(f"input size {text!r} must be positive")
    return h, w


# The configurations of the paper's ablation tables (H-DETR + R50: d = 256, 4 levels, C1 256 ch) as
# overrides of the default config, with the paper's #params▲ (M) and #FLOPs▲ (G, multiply-adds).
# ``{d}`` is the detector width and ``{D128}``/``{D96}``/``{D64}`` the channel-mapper widths (tests
# format them for tiny widths). Table 10 (RoI size) prints no #params▲; Table 16 is separate below.
_T1 = (
    "neck.enabled=false",
    "image_encoder.layers=0",
    "box_encoder.layers=0",
    "box_encoder.dim={d}",
    "query_encoder.ffn=false",
    "query_encoder.b2o=false",
    "mask_scoring.enabled=false",
)
_T3 = (*_T1, "image_encoder.layers=2")
_T5 = (*_T3, "box_encoder.layers=2", "box_encoder.dim={D128}")
PAPER_ROWS: tuple[tuple[str, str, tuple[str, ...], float, float], ...] = (
    ("Table 1", "no RoIAlign, no 1/4 feat.", (*_T1, "roi=false", "fuse_c1=false"), 0.0, 1.49),
    ("Table 1", "RoIAlign, no 1/4 feat.", (*_T1, "fuse_c1=false"), 0.0, 0.53),
    ("Table 1", "no RoIAlign, 1/4 feat.", (*_T1, "roi=false"), 0.0, 1.50),
    ("Table 1", "RoIAlign, 1/4 feat.", _T1, 0.0, 0.54),
    *[
        ("Table 2", f"image {b} x{n}", (*_T1, f"image_encoder.block={b}", f"image_encoder.layers={n}"), p, f)
        for b, rows in (
            ("deformable", ((1, 0.76, 14.71), (2, 1.51, 28.88), (3, 2.27, 43.04))),
            ("swin", ((1, 0.80, 14.20), (2, 1.59, 27.86), (3, 2.39, 41.51))),
            ("convnext", ((1, 0.54, 8.12), (2, 1.08, 15.70), (3, 1.62, 23.27))),
        )
        for n, p, f in rows
    ],
    *[
        ("Table 3", f"box {b} x{n}", (*_T3, f"box_encoder.block={b}", f"box_encoder.layers={n}"), p, f)
        for b, rows in (
            ("deformable", ((1, 2.46, 98.55), (2, 3.14, 168.23), (3, 3.82, 237.91))),
            ("swin", ((1, 2.31, 112.84), (2, 3.10, 196.81), (3, 3.89, 280.77))),
            ("convnext", ((1, 2.05, 83.90), (2, 2.59, 138.92), (3, 3.13, 193.95))),
        )
        for n, p, f in rows
    ],
    ("Table 4", "D=256", (*_T3, "box_encoder.layers=2"), 3.14, 168.23),
    ("Table 4", "D=128", _T5, 2.07, 66.60),
    ("Table 4", "D=96", (*_T3, "box_encoder.layers=2", "box_encoder.dim={D96}"), 1.87, 50.76),
    ("Table 4", "D=64", (*_T3, "box_encoder.layers=2", "box_encoder.dim={D64}"), 1.71, 39.11),
    ("Table 5", "FFN", (*_T5, "query_encoder.ffn=true"), 2.33, 66.63),
    ("Table 5", "FFN+O2O", (*_T5, "query_encoder.ffn=true", "query_encoder.o2o=true"), 2.53, 66.65),
    ("Table 5", "FFN+B2O", (*_T5, "query_encoder.ffn=true", "query_encoder.b2o=true"), 2.46, 73.40),
    ("Table 12", "neck", ("mask_scoring.enabled=false",), 2.53, 77.07),
    ("Table 12", "neck+points+scoring (default)", (), 3.26, 82.09),
    ("Table 14", "segmenter head", ("mask_head.kind=segmenter",), 3.29, 83.77),
)

# Table 16 (DINO + FocalNet-L: d = 256, 5 levels incl. stride 4, C1 192 ch): (image layers, box layers,
# paper #params▲ M, paper #FLOPs▲ G). The paper's box-encoder layer there adds 0.38 M / 64.4 G where
# the H-DETR tables' 128-d layer adds 0.18 M / 18 G; see tests/test_masknet_params.py.
PAPER_TABLE16: tuple[tuple[int, int, float, float], ...] = (
    (2, 2, 3.24, 262.27),
    (2, 3, 3.62, 326.65),
    (3, 2, 4.03, 320.44),
    (3, 3, 4.40, 384.82),
    (4, 4, 5.56, 507.38),
)


def paper_row_overrides(
    overrides: Sequence[str], *, d: int = 256, d128: int = 128, d96: int = 96, d64: int = 64
) -> list[str]:
    """A :data:`PAPER_ROWS` entry's overrides with the width placeholders filled in."""
    return [o.format(d=d, D128=d128, D96=d96, D64=d64) for o in overrides]
