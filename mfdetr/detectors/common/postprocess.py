"""Official DETR-family post-processing for box-AP evaluation (``PostProcess``).

``prob = sigmoid(logits)``; top-``num_select`` over the flattened (queries × classes) scores;
``label = idx % C``, ``query = idx // C``; boxes cxcywh → xyxy, scaled by the original image size.
No NMS. DINO uses ``num_select = 300``, H-Deformable-DETR 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mfdetr.ops import box_cxcywh_to_xyxy


@dataclass
class Detections:
    """Detections of one image: ``scores`` [N], ``category_ids`` [N] int64 (dataset ids via the
    preset's slot → category map), ``labels`` [N] head slots, ``boxes`` [N, 4] absolute xyxy pixels of
    the original image, sorted by score (descending)."""

    scores: Tensor
    category_ids: Tensor
    labels: Tensor
    boxes: Tensor


def postprocess_detections(
    logits: Tensor, boxes: Tensor, orig_hw: Tensor, *, num_select: int, class_to_category: Sequence[int]
) -> list[Detections]:
    """Top-``num_select`` (query, class) pairs per image.

    Args:
        logits: [B, Q, C] class logits of all queries.
        boxes: [B, Q, 4] normalised cxcywh (relative to the unpadded input image).
        orig_hw: [B, 2] original image sizes (h, w).
        class_to_category: category id of each of the C head slots.
    """
    bsz, nq, nc = logits.shape
    prob = logits.float().sigmoid().view(bsz, -1)
    k = min(num_select, nq * nc)
    scores, idx = prob.topk(k, dim=1)
    query = torch.div(idx, nc, rounding_mode="floor")
    labels = idx % nc
    xyxy = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query[..., None].expand(-1, -1, 4))
    hw = orig_hw.to(xyxy.device, torch.float32)
    xyxy = xyxy * torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]
    cat_map = torch.as_tensor(list(class_to_category), dtype=torch.long, device=labels.device)
    return [
        Detections(scores=scores[b], category_ids=cat_map[labels[b]], labels=labels[b], boxes=xyxy[b])
        for b in range(bsz)
    ]
