"""A tiny convolutional backbone for tests and tiny presets (same :class:`Backbone` contract).

Four stages of ``conv3x3(stride 2) → ReLU`` (the first stage has a stride-2 stem before it), so stage
``i`` has stride ``4·2^i`` and ``ceil`` output sizes, exactly like the real backbones. Random weights;
it exists so that every detector's code path runs in milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.contracts import ShapeSpec
from mfdetr.detectors.backbones.base import Backbone


class TinyConvBackbone(Backbone):
    """Tiny CNN: channels ``widths[i]`` at stride ``4·2^i``.

    Args:
        widths: channels of stages 0..3.
        out_indices: stages the detector uses (stage 0 is returned as C1 in any case).
    """

    def __init__(self, *, widths: Sequence[int] = (8, 16, 32, 64), out_indices: Sequence[int] = (1, 2, 3)) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must give 4 stages, got {tuple(widths)}")
        self.stem = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1)
        chans = [widths[0], *widths]
        self.stages = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, stride=2, padding=1) for i in range(4)
        )
        self.out_indices = tuple(out_indices)
        self.stage_specs = tuple(ShapeSpec(channels=int(w), stride=4 * 2**i) for i, w in enumerate(widths))

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = F.relu(self.stem(x))
        outs: dict[int, Tensor] = {}
        keep = set(self.out_indices) | {0}
        for i, stage in enumerate(self.stages):
            x = F.relu(stage(x))
            if i in keep:
                outs[i] = x
        return outs

    def stage0(self) -> nn.Module:
        return nn.Sequential(self.stem, nn.ReLU(), self.stages[0], nn.ReLU())
