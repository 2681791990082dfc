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


_NUMBER_TYPES = {int, float}


def _valid_polygon(poly: Any) -> bool:
    """A usable polygon: ≥ 3 points (6 numbers), an even count, all finite numbers (not bools)."""
    if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
        return False
    return set(map(type, poly)) <= _NUMBER_TYPES and all(map(math.isfinite, poly))


def rle_string_counts(counts: str | bytes) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, or ``None`` when the string is malformed.

    Reads pycocotools' ``rleFrString`` format (6-bit groups from ``'0'``; a set bit 5 continues a
    number, bit 4 of the last group is its sign; counts after the second are deltas to the one two
    before) so that a damaged string is recognised before pycocotools decodes it (its decoder trusts
    the counts to cover exactly height × width pixels).
    """
    try:
        data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:
        return None
    out: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n or k > 12:  # truncated, or longer than any 64-bit count
                return None
            c = data[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def clean_segmentation(segm: Any, h: int, w: int) -> tuple[Any, str | None]:
    """Check a COCO ``segmentation`` of an ``h × w`` image: ``(usable segmentation, None)`` or
    ``(None, why it is unusable)``.

    Polygons: parts with < 3 points, an odd count or non-finite numbers are removed (a 4-number part
    would make pycocotools read the list as boxes); no part left → unusable. RLE: ``size`` must be
    ``[h, w]`` and the counts (a list, or a compressed string) non-negative integers summing to h·w.
    """
    if isinstance(segm, list):
        polys = [p for p in segm if _valid_polygon(p)]
        if not polys:
            return None, "polygon with < 3 points, odd length or non-finite numbers"
        return (segm if len(polys) == len(segm) else polys), None
    if not isinstance(segm, dict):
        return None, "segmentation neither polygons nor an RLE"
    size, counts = segm.get("size"), segm.get("counts")
    if not (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        return None, "RLE without an integer [height, width] size"
    if [int(size[0]), int(size[1])] != [h, w]:
        return None, "RLE size differs from the image size"
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return None, "RLE with non-integer or negative counts"
    elif isinstance(counts, (str, bytes)):
        counts = rle_string_counts(counts)
        if counts is None or any(c < 0 for c in counts):
            return None, "undecodable compressed RLE counts"
    else:
        return None, "RLE counts neither a list nor a string"
    if sum(counts) != h * w:
        return None, "RLE counts do not sum to height x width"
    return segm, None


def segmentation_to_rle(segm: Any, h: int, w: int) -> dict[str, Any] | None:
    """COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) → one compressed RLE.

    Returns ``None`` for an unusable segmentation (see :func:`clean_segmentation`: no polygon with
    ≥ 3 points, an RLE of the wrong size or with damaged counts) — the caller ignores such an instance.
    """
    segm, why = clean_segmentation(segm, h, w)
    if why is not None:
        return None
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in segm], h, w))
    counts = segm["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}


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
