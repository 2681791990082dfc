"""The backbone contract shared by every detector family.

A backbone maps a normalised image batch [B, 3, H, W] to its stage outputs. Stages are numbered
0..3 with strides 4, 8, 16, 32. The detector asks for ``out_indices`` (e.g. (1, 2, 3) for 4-scale
DINO, (0, 1, 2, 3) for 5-scale); stage 0 (stride 4) is **always** returned too, because it is the C1
map of Mask Frozen-DETR (eq. 1). Where the official backbone applies a per-output norm (Swin,
FocalNet: ``norm{i}`` exists only for returned stages), returned stages are normed; stage 0 when not
in ``out_indices`` is the raw stage output.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mfdetr.contracts import ShapeSpec
from mfdetr.errors import MfdetrError


def check_out_indices(out_indices: Sequence[int], num_stages: int, what: str) -> tuple[int, ...]:
    """Validate ``out_indices`` (non-empty, strictly ascending, within the stages) for ``what``."""
    idx = tuple(int(i) for i in out_indices)
    if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= num_stages:
        raise MfdetrError(
            f"{what}: out_indices must be strictly ascending stage numbers in 0..{num_stages - 1},"
            f" got {list(out_indices)}"
        )
    return idx


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

    def stage0(self) -> nn.Module:
        """A module computing only C1 (``images -> self(images)[0]``, same ops, same weights): what a
        ``--c1 recompute`` cache exports. The default runs the whole backbone; subclasses return the
        stem and first stage alone."""
        return _FirstOutput(self)


class _FirstOutput(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)[0]


class StagedTokenBackbone(Backbone):
    """A hierarchical transformer-style backbone (Swin, FocalNet): a patch stem, four stages that each
    return ``(stage output [B, H, W, C], input of the next stage)``, and one LayerNorm ``norm{i}`` per
    returned stage — the official module names, so official weights load unchanged.

    ``forward(x [B, 3, H, W])`` → ``{i: [B, C_i, ceil(H/(p·2^i)), ceil(W/(p·2^i))]}`` for
    ``out_indices`` ∪ {0}, channel-first, contiguous.
    """

    def __init__(
        self,
        *,
        name: str,
        patch_embed: nn.Module,
        stages: Sequence[nn.Module],
        channels: Sequence[int],
        patch_size: int,
        out_indices: Sequence[int],
    ) -> None:
        super().__init__()
        if len(stages) != 4 or len(channels) != 4:
            raise MfdetrError(f"{name}: the backbone contract needs 4 stages, got {len(stages)}")
        self.out_indices = check_out_indices(out_indices, 4, name)
        self.stage_specs = tuple(ShapeSpec(channels=int(c), stride=patch_size * 2**i) for i, c in enumerate(channels))
        self.patch_embed = patch_embed
        self.layers = nn.ModuleList(stages)
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        wanted = sorted(set(self.out_indices) | {0})
        outs: dict[int, Tensor] = {}
        y: Tensor | None = self.patch_embed(x)
        for i in range(wanted[-1] + 1):
            assert y is not None
            stage_out, y = self.layers[i](y)
            if i in self.out_indices:
                stage_out = getattr(self, f"norm{i}")(stage_out)
            if i in wanted:
                outs[i] = stage_out.permute(0, 3, 1, 2).contiguous()
        return outs

    def stage0(self) -> nn.Module:
        return _TokenStage0(self)


class _TokenStage0(nn.Module):
    """Patch stem + stage 0 (+ ``norm0`` when stage 0 is a returned level) of a token backbone."""

    def __init__(self, b: StagedTokenBackbone) -> None:
        super().__init__()
        self.patch_embed, self.layer0 = b.patch_embed, b.layers[0]
        self.norm0 = getattr(b, "norm0", None) if 0 in b.out_indices else None

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.layer0(self.patch_embed(x))
        if self.norm0 is not None:
            y = self.norm0(y)
        return y.permute(0, 3, 1, 2).contiguous()
