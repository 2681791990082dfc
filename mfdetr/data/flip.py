"""Horizontal flip of ground-truth instances (the GT of a cache's flipped view, :mod:`mfdetr.cache.views`)."""

from __future__ import annotations

import torch

from mfdetr.contracts import GTInstances


def hflip_instances(target: GTInstances) -> GTInstances:
    """``target`` mirrored left-right in its own (original image) frame: masks flipped along the width,
    pixel-edge xyxy boxes mapped ``x1, x2 → W − x2, W − x1`` (``W`` = ``orig_hw[1]``). Applying it twice
    gives ``target`` back."""
    w = float(target.orig_hw[1])
    b = target.boxes
    boxes = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1) if len(b) else b.clone()
    return GTInstances(
        boxes=boxes,
        labels=target.labels.clone(),
        masks=target.masks.flip(-1),
        iscrowd=target.iscrowd.clone(),
        image_id=target.image_id,
        orig_hw=target.orig_hw,
    )
