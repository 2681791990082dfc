"""Small hand-made detector outputs and ground truth for the mask network's target, loss and
post-processing tests."""

from __future__ import annotations

import torch

from mfdetr.contracts import DetectorOutput, GTInstances


def make_det(
    boxes_xyxy: list[list[float]],
    orig_hw: tuple[int, int],
    *,
    num_classes: int = 4,
    labels: list[int] | None = None,
    input_hw: tuple[int, int] | None = None,
) -> DetectorOutput:
    """One-image DetectorOutput whose boxes are the given original-pixel xyxy boxes."""
    h0, w0 = orig_hw
    b = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    k = b.shape[0]
    cxcywh = torch.stack(
        [
            (b[:, 0] + b[:, 2]) / 2 / w0,
            (b[:, 1] + b[:, 3]) / 2 / h0,
            (b[:, 2] - b[:, 0]) / w0,
            (b[:, 3] - b[:, 1]) / h0,
        ],
        dim=-1,
    )
    logits = torch.full((1, k, num_classes), -5.0)
    for i, lab in enumerate(labels or []):
        logits[0, i, lab] = 5.0
    ih = input_hw or orig_hw
    return DetectorOutput(
        queries=torch.zeros(1, k, 8),
        boxes=cxcywh[None],
        logits=logits,
        enc_maps={4: [torch.zeros(1, 8, 2, 2)]},
        c1=torch.zeros(1, 4, 4, 4),
        input_hw=torch.tensor([ih]),
        orig_hw=torch.tensor([orig_hw]),
        level_valid_hw=torch.tensor([[[2, 2]]]),
    )


def make_gt(
    rects: list[tuple[int, int, int, int]],
    hw: tuple[int, int],
    *,
    crowd: list[bool] | None = None,
    labels: list[int] | None = None,
) -> GTInstances:
    """GT with rectangular masks ``(x0, y0, x1, y1)`` (pixels x0..x1-1), boxes = the rectangles."""
    n = len(rects)
    masks = torch.zeros(n, *hw, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    return GTInstances(
        boxes=torch.tensor(rects, dtype=torch.float32).reshape(n, 4),
        labels=torch.tensor(labels or [1] * n, dtype=torch.long),
        masks=masks,
        iscrowd=torch.tensor(crowd or [False] * n, dtype=torch.bool),
        image_id=1,
        orig_hw=hw,
    )
