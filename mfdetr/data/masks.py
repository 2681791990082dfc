"""COCO segmentations ↔ binary masks (pycocotools RLE), and boxes of masks.

Conventions: a mask is ``[H, W]`` (or ``[N, H, W]``) bool/uint8, row-major as an image; an RLE is
COCO's ``{"size": [H, W], "counts": str}`` (compressed counts as ``str`` so it is JSON-ready).
Boxes of masks are tight pixel-edge boxes: ``x1 = last column + 1`` (as pycocotools' ``toBbox``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # torch is imported lazily so the torch-free tools (synth, eval-json) start fast
    from torch import Tensor


def _valid_polygon(poly: Any) -> bool:
    """A usable polygon: ≥ 3 points (6 numbers), an even count, all finite numbers."""
    if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly)


def segmentation_to_rle(segm: Any, h: int, w: int) -> dict[str, Any] | None:
    """COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) → one compressed RLE.

    Returns ``None`` for a degenerate segmentation (no polygon with ≥ 3 points, an RLE of the wrong
    size or of an unknown form) — the caller ignores such an instance as a target.
    """
    if isinstance(segm, list):
        polys = [[float(v) for v in p] for p in segm if _valid_polygon(p)]
        if not polys:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and [int(size[0]), int(size[1])] == [h, w]):
            return None
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                return None
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, (str, bytes)):
            return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    return None


def decode_rles(rles: dict[str, Any] | list[dict[str, Any]]) -> np.ndarray:
    """pycocotools ``decode`` (``[H, W]`` for one RLE, ``[H, W, N]`` for a list) as uint8, quietly.

    (pycocotools ≤ 2.0.8 emits a NumPy-2 ``copy=`` DeprecationWarning on every call.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rles)


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Compressed RLE → bool mask ``[H, W]``."""
    return decode_rles(rle).astype(bool)


def mask_to_rle(mask: Tensor | np.ndarray) -> dict[str, Any] | list[dict[str, Any]]:
    """Binary mask(s) → compressed COCO RLE with ``counts`` as ``str`` (JSON-ready).

    Args:
        mask: ``[H, W]`` → one RLE dict; ``[N, H, W]`` → a list of N RLE dicts. Any dtype; nonzero = on.
    """
    if hasattr(mask, "detach"):  # a torch Tensor
        mask = mask.detach().to("cpu").numpy()
    m = np.asarray(mask)
    single = m.ndim == 2
    if single:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must be [H,W] or [N,H,W], got shape {m.shape}")
    rles = mask_utils.encode(np.asfortranarray((m != 0).transpose(1, 2, 0).astype(np.uint8)))
    out = [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]
    return out[0] if single else out


def masks_to_boxes_xyxy(masks: Tensor) -> Tensor:
    """Tight pixel-edge boxes of bool masks ``[N, H, W]`` → float32 ``[N, 4]`` xyxy (x1 = last col + 1).

    Empty masks get ``[0, 0, 0, 0]``.
    """
    import torch

    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    cols = masks.any(dim=1)  # [N, W]
    rows = masks.any(dim=2)  # [N, H]
    w, h = cols.shape[1], rows.shape[1]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    empty = ~cols.any(dim=1)
    boxes[empty] = 0.0
    return boxes
