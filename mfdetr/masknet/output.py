"""What the mask network returns (:class:`MaskNetOutput`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

C1_STRIDE = 4


@dataclass
class MaskNetOutput:
    """What the mask network returns for B images and K queries.

    - ``mask_logits``: RoI mode (``roi=True``) [B, K, S, S] logits on each box's S×S grid (row-major,
      the grid spans the detector box ``boxes`` in the input frame: cell (i, j) covers
      ``x1 + (j, j+1)·w/S``); non-RoI baseline (``roi=False``) [B, K, H1, W1] logits on the stride-4
      grid of the (padded) input canvas, valid in ``mask_valid_hw``.
    - ``iou_pred``: [B, K] predicted mask IoU in [0, 1] (eq. 12), or ``None`` without mask scoring.
    - ``boxes``: [B, K, 4] the boxes used, normalised cxcywh of the unpadded input image.
    - ``scores``: [B, K] detector classification scores c_i (max sigmoid over classes, eq. 2/13).
    - ``logits``: [B, K, C] detector class logits of the kept queries (labels = argmax).
    - ``input_hw``, ``orig_hw``: [B, 2] int64, as in :class:`DetectorOutput`.
    - ``mask_valid_hw``: [B, 2] int64 valid size of the stride-4 grid, ``ceil(input_hw / 4)``.
    - ``roi``: which of the two layouts ``mask_logits`` has; ``mask_stride``: 4 (non-RoI grid stride).
    - ``selected``: ``None`` when ``mask_logits`` / ``iou_pred`` hold all K queries of every image (the
      layouts above); else ``(batch_idx, query_idx)`` [P] int64: they hold only those P queries, row
      ``p`` being query ``query_idx[p]`` of image ``batch_idx[p]`` (``mask_logits`` [P, S, S] or
      [P, H1, W1], ``iou_pred`` [P]). ``boxes``, ``scores``, ``logits`` stay [B, K, ...].
    - ``assignment``: the training targets' :class:`~mfdetr.masknet.targets.Assignment` the selection
      was made for (set by :class:`~mfdetr.masknet.positives.PositivesOnly`), else ``None``.
    """

    mask_logits: Tensor
    iou_pred: Tensor | None
    boxes: Tensor
    scores: Tensor
    logits: Tensor
    input_hw: Tensor
    orig_hw: Tensor
    mask_valid_hw: Tensor
    roi: bool = True
    mask_stride: int = C1_STRIDE
    selected: tuple[Tensor, Tensor] | None = None
    assignment: Any = None

    def select(self, batch_idx: Tensor, query_idx: Tensor) -> MaskNetOutput:
        """The rows of queries ``(batch_idx, query_idx)`` of an all-K output (see ``selected``)."""
        if self.selected is not None:
            raise ValueError("this output already holds a selection of queries")
        dev = self.mask_logits.device
        bi, qi = batch_idx.to(dev), query_idx.to(dev)
        iou = None if self.iou_pred is None else self.iou_pred[bi, qi]
        return dataclasses.replace(self, mask_logits=self.mask_logits[bi, qi], iou_pred=iou, selected=(bi, qi))
