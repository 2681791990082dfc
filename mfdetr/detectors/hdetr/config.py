"""Typed architecture config of H-Deformable-DETR (any size; presets are instances of it)."""

from __future__ import annotations

from dataclasses import dataclass

from mfdetr.detectors.common.arch import DetrArchConfig
from mfdetr.errors import MfdetrError


@dataclass(frozen=True)
class HDetrConfig(DetrArchConfig):
    """H-Deformable-DETR (HDETR/H-Deformable-DETR, ``--with_box_refine --two_stage --mixed_selection
    --look_forward_twice``, hybrid branch), inference semantics.

    Inherits the shared sizes of :class:`~mfdetr.detectors.common.arch.DetrArchConfig` (official
    defaults: d 256, 8 heads, 6/6 layers, FFN 2048, 4/4 points, 4 levels, 91 classes, top-100).

    Args:
        num_queries_one2one: queries of the one-to-one branch — the only ones run at inference
            (``engine.evaluate`` sets ``num_queries = two_stage_num_proposals = num_queries_one2one``).
        num_queries_one2many: training-only one-to-many queries; their rows of ``query_embed`` are
            in released checkpoints (``query_embed`` has one2one + one2many rows), so they load.
        inv_sigmoid_eps: clamp of ``inverse_sigmoid`` in the box refinement (official 1e-5; detrex 1e-3).
    """

    num_queries_one2one: int = 300
    num_queries_one2many: int = 1500
    inv_sigmoid_eps: float = 1e-5

    def inference_queries(self) -> int:
        return self.num_queries_one2one

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_queries_one2one < 1 or self.num_queries_one2many < 0:
            raise MfdetrError(
                f"num_queries_one2one must be >= 1 and num_queries_one2many >= 0, got "
                f"{self.num_queries_one2one}, {self.num_queries_one2many}"
            )
