"""#params▲ and #FLOPs▲ of a mask network, per component, like the paper's tables.

- #params▲: trainable parameters of the MaskNet (the detector is frozen and adds none).
- #FLOPs▲: counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one synthetic image of
  the detector's typical input size with K queries. That counter counts **2 FLOPs per multiply-add**
  of matmuls and convolutions and does not count ``grid_sample`` (the deformable sampling),
  RoIAlign, interpolation, normalisation or element-wise ops. The paper's #FLOPs▲ appear to count
  multiply-adds (fvcore convention; e.g. Table 3: 69.7 G per 256-d box-encoder layer ≈ 682 k
  MACs/token × 100 RoIs × 1024 tokens), so compare its numbers with our **GMACs = FLOPs / 2**.

Detector metadata enters as a :class:`FeatureSpec` (d, level strides, C1 channels, input size); the
CLI fills it from the detector registry or from explicit values, never importing detectors here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


def synthetic_detector_output(spec: FeatureSpec, *, num_queries: int = 100, enc_layer: int = 4,
                              batch_size: int = 1, seed: int = 0) -> DetectorOutput:
    """A random, valid :class:`DetectorOutput` with the shapes a detector of ``spec`` produces."""
    g = torch.Generator().manual_seed(seed)
    h, w = spec.input_hw
    b, k, d = batch_size, num_queries, spec.d_model
    maps = [torch.randn(b, d, math.ceil(h / s), math.ceil(w / s), generator=g) for s in spec.level_strides]
    cxcy = torch.rand(b, k, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(b, k, 2, generator=g) * 0.35 + 0.05
    return DetectorOutput(
        queries=torch.randn(b, k, d, generator=g), boxes=torch.cat((cxcy, wh), -1),
        logits=torch.randn(b, k, spec.num_classes, generator=g), enc_maps={enc_layer: maps},
        c1=torch.randn(b, spec.c1_channels, math.ceil(h / 4), math.ceil(w / 4), generator=g),
        input_hw=torch.tensor([[h, w]] * b), orig_hw=torch.tensor([[h, w]] * b),
        level_valid_hw=torch.tensor([[[math.ceil(h / s), math.ceil(w / s)] for s in spec.level_strides]] * b))


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


def flops_by_component(model: MaskNet, det: DetectorOutput) -> dict[str, int]:
    """FLOPs (torch's counter: 2·MACs of matmul/conv) of one forward, per component, ``other``
    (ops in MaskNet.forward itself, e.g. the non-RoI dot product) and ``total``."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    # no autograd at all: torch's module tracker trips over views of parameters made under no_grad
    model.eval().requires_grad_(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
            model(det)
    finally:
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
        lines.append("FLOPs: torch.utils.flop_counter.FlopCounterMode, 2 per multiply-add of matmul/conv; "
                     "grid_sample (deformable sampling), RoIAlign, interpolation, norms and element-wise ops "
                     "are not counted. The paper's #FLOPs▲ appear to be multiply-adds: compare with GMACs.")
        lines.extend(self.notes)
        return "\n".join(lines)


def describe(model: MaskNet, spec: FeatureSpec, *, num_queries: int = 100, enc_layer: int | None = None) -> ComplexityReport:
    """Count #params▲ and FLOPs of ``model`` for one image of ``spec.input_hw`` with ``num_queries`` queries."""
    det = synthetic_detector_output(spec, num_queries=num_queries,
                                    enc_layer=model.enc_layer if enc_layer is None else enc_layer)
    k = min(num_queries, model.num_queries)
    return ComplexityReport(params=params_by_component(model), flops=flops_by_component(model, det), spec=spec,
                            num_queries=k, roi_size=model.roi_size)


def parse_levels(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"8/16/32/64"`` or ``"8,16,32,64"`` → (8, 16, 32, 64)."""
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    parts = [p for p in text.replace(",", "/").split("/") if p.strip()]
    return tuple(int(p) for p in parts)
