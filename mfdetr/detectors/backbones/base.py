"""The backbone contract shared by every detector family.

A backbone maps a normalised image batch [B, 3, H, W] to its stage outputs. Stages are numbered
0..3 with strides 4, 8, 16, 32. The detector asks for ``out_indices`` (e.g. (1, 2, 3) for 4-scale
DINO, (0, 1, 2, 3) for 5-scale); stage 0 (stride 4) is **always** returned too, because it is the C1
map of Mask Frozen-DETR (eq. 1). Where the official backbone applies a per-output norm (Swin,
FocalNet: ``norm{i}`` exists only for returned stages), returned stages are normed; stage 0 when not
in ``out_indices`` is the raw stage output.
"""

from __future__ import annotations

from torch import Tensor, nn

from mfdetr.contracts import ShapeSpec


class Backbone(nn.Module):
    """Base class: subclasses set ``out_indices`` and ``stage_specs`` and implement ``forward``.

    Attributes:
        out_indices: stages the detector uses (subset of 0..3, ascending).
        stage_specs: ``ShapeSpec`` of all four stages (channels, stride), index = stage.
    """

    out_indices: tuple[int, ...]
    stage_specs: tuple[ShapeSpec, ...]

    def forward(self, x: Tensor) -> dict[int, Tensor]:  # pragma: no cover - interface
        """Return ``{stage: [B, C_stage, ceil(H/stride), ceil(W/stride)]}`` for ``out_indices`` ∪ {0}."""
        raise NotImplementedError

    @property
    def out_specs(self) -> tuple[ShapeSpec, ...]:
        """Specs of the returned stages, in ``out_indices`` order."""
        return tuple(self.stage_specs[i] for i in self.out_indices)

    @property
    def c1_spec(self) -> ShapeSpec:
        return self.stage_specs[0]
