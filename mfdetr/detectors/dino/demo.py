"""The ``demo`` preset: a small DINO trained from scratch on the synthetic dataset, shipped in the package.

Same detector code as the real presets (:func:`~mfdetr.detectors.dino.presets.build_dino`); only the
config is small:

- backbone ``resnet_bn``: a ResNet-18-style trunk (BasicBlocks, depths 2-2-2-2) at half width
  (stage channels 32, 64, 128, 256 at strides 4, 8, 16, 32) with **trainable** batch-norm (a
  from-scratch backbone needs it; in ``eval()`` it uses its running statistics). Stage 0 is C1.
- encoder levels = stages 1..3 (strides 8/16/32), ``d = 128``, 8 heads, FFN 512, 3 encoder + 3
  decoder layers, 100 queries, 6 classes (the synthetic categories 1..6: disc, box, triangle, arc,
  cross, star — :data:`mfdetr.data.synth_render.SYNTH_CLASSES`).
- preprocessing: shorter side 160 (the synthetic image size, so images are not resized), longer side
  ≤ 224 (synthetic images are at most 4/3 · 160 = 213 px long), ImageNet mean/std.

The weights (:data:`DEMO_CHECKPOINT`, ≤ 20 MB, ``{"model": state_dict}``) are produced by ``python -m
mfdetr.detectors.training train --recipe pipeline/detectors/demo_dino.toml`` (see
:mod:`mfdetr.detectors.training`). Only 3 encoder layers: ``detect(..., enc_layers=...)`` takes 1..3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mfdetr.contracts import Preprocessing, ShapeSpec
from mfdetr.detectors.backbones import Backbone, BackboneConfig, register_backbone_kind
from mfdetr.detectors.dino.config import DinoConfig
from mfdetr.detectors.dino.model import DinoDetector
from mfdetr.detectors.dino.presets import build_dino, dino_preset
from mfdetr.detectors.registry import register_detector
from mfdetr.errors import MfdetrError


class _BasicBlock(nn.Module):
    """ResNet BasicBlock (two 3x3 convs, trainable BN, projection shortcut when the shape changes)."""

    def __init__(self, *, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        nn.init.zeros_(self.bn2.weight)  # zero-init residual: every block starts as the identity

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (y + self.down(x)).relu()


class ResNetBNBackbone(Backbone):
    """ResNet (BasicBlock) with trainable BN: stem conv7x7/2 + maxpool/2, then 4 stages.

    Args:
        widths: channels of stages 0..3 (ResNet-18: 64, 128, 256, 512).
        depths: BasicBlocks per stage (ResNet-18: 2, 2, 2, 2).
        out_indices: stages the detector uses (stage 0, stride 4, is always returned as C1).
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        out_indices: Sequence[int] = (1, 2, 3),
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"widths and depths must give 4 stages, got {tuple(widths)}, {tuple(depths)}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, depths, strict=True)):
            blocks = [
                _BasicBlock(cin=cin if j == 0 else w, cout=w, stride=2 if (i > 0 and j == 0) else 1) for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.out_indices = tuple(out_indices)
        self.stage_specs = tuple(ShapeSpec(channels=int(w), stride=4 * 2**i) for i, w in enumerate(widths))

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.stem(x)
        outs: dict[int, Tensor] = {}
        keep = set(self.out_indices) | {0}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in keep:
                outs[i] = x
            if i >= max(keep):
                break
        return outs

    def stage0(self) -> nn.Module:
        return nn.Sequential(self.stem, self.stages[0])


register_backbone_kind("resnet_bn", ResNetBNBackbone)

#: synthetic category ids of the 6 head slots (``mfdetr synth``: disc, box, triangle, arc, cross, star)
DEMO_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
DEMO_CONFIG = DinoConfig(
    backbone=BackboneConfig(
        kind="resnet_bn", out_indices=(1, 2, 3), params={"widths": (32, 64, 128, 256), "depths": (2, 2, 2, 2)}
    ),
    hidden_dim=128,
    nheads=8,
    enc_layers=3,
    dec_layers=3,
    dim_feedforward=512,
    enc_n_points=4,
    dec_n_points=4,
    num_queries=100,
    num_feature_levels=3,
    num_classes=len(DEMO_CATEGORY_IDS),
    dn_labelbook_size=len(DEMO_CATEGORY_IDS),
    num_select=100,
)
DEMO_PREPROCESSING = Preprocessing(short_side=160, max_size=224)
#: the shipped weights (inside the package)
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "demo_dino.pt"
DEMO_PRESET = dataclasses.replace(
    dino_preset(
        "demo",
        DEMO_CONFIG,
        DEMO_CHECKPOINT.name,
        51.1,
        "small DINO (half-width ResNet-18 with trainable BN, d=128, 3+3 layers, 100 queries) trained "
        "from scratch on the synthetic dataset; weights shipped in mfdetr/detectors/weights/",
    ),
    class_to_category=DEMO_CATEGORY_IDS,
    preprocessing=DEMO_PREPROCESSING,
)


def build_demo(*, checkpoint: str | Path | dict[str, Any] | None = None, device: str = "cpu") -> DinoDetector:
    """The frozen ``demo`` detector with the shipped weights (or ``checkpoint`` when given)."""
    if checkpoint is None:
        if not DEMO_CHECKPOINT.is_file():
            raise MfdetrError(
                f"the demo detector's weights are not shipped in this checkout ({DEMO_CHECKPOINT}); "
                "train them with `python -m mfdetr.detectors.training train --recipe "
                "pipeline/detectors/demo_dino.toml --out RUN data.root=SYNTH` and ship "
                "RUN/weights.pt there, or pass checkpoint="
            )
        checkpoint = DEMO_CHECKPOINT
    return build_dino(DEMO_CONFIG, preset=DEMO_PRESET, checkpoint=checkpoint, device=device)


register_detector(DEMO_PRESET, build_demo)

__all__ = [
    "DEMO_CATEGORY_IDS",
    "DEMO_CHECKPOINT",
    "DEMO_CONFIG",
    "DEMO_PREPROCESSING",
    "DEMO_PRESET",
    "ResNetBNBackbone",
    "build_demo",
]
