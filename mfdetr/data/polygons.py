"""Binary mask → exact COCO polygons along pixel edges (no OpenCV).

Every 4-connected component is traced along the edges of its pixels (vertices at integer pixel
corners), collinear vertices are dropped, and the result is checked by rasterising it back with
pycocotools: a polygon through pixel corners rasterises to exactly the pixels it encloses, so the
round trip is exact unless a component has a hole or touches itself at a corner — then
:func:`mask_to_polygons` returns ``None`` and the caller stores an RLE instead.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from mfdetr.data.masks import decode_rles


def _trace_component(comp: np.ndarray) -> list[int] | None:
    """Outer pixel-edge loop of one 4-connected component ``[h, w]`` bool → flat [x0, y0, x1, y1, ...].

    ``None`` when the boundary is not a single simple loop (hole or corner pinch).
    """
    h, w = comp.shape
    p = np.pad(comp, 1)
    inner = p[1:-1, 1:-1]
    ys, xs = np.nonzero(inner & ~p[:-2, 1:-1])  # top edges: (x, y) → (x+1, y)
    starts = [np.stack([xs, ys], 1)]
    ends = [np.stack([xs + 1, ys], 1)]
    ys, xs = np.nonzero(inner & ~p[1:-1, 2:])  # right edges: (x+1, y) → (x+1, y+1)
    starts.append(np.stack([xs + 1, ys], 1))
    ends.append(np.stack([xs + 1, ys + 1], 1))
    ys, xs = np.nonzero(inner & ~p[2:, 1:-1])  # bottom edges: (x+1, y+1) → (x, y+1)
    starts.append(np.stack([xs + 1, ys + 1], 1))
    ends.append(np.stack([xs, ys + 1], 1))
    ys, xs = np.nonzero(inner & ~p[1:-1, :-2])  # left edges: (x, y+1) → (x, y)
    starts.append(np.stack([xs, ys + 1], 1))
    ends.append(np.stack([xs, ys], 1))
    s = np.concatenate(starts)
    e = np.concatenate(ends)
    n = len(s)
    key_s = s[:, 1] * (w + 1) + s[:, 0]
    key_e = e[:, 1] * (w + 1) + e[:, 0]
    if len(np.unique(key_s)) != n:
        return None  # a vertex with two outgoing edges: corner pinch
    edge_at = np.full((h + 1) * (w + 1), -1, dtype=np.int64)
    edge_at[key_s] = np.arange(n)
    nxt = edge_at[key_e]
    # follow the chain from edge 0; a single loop visits every edge exactly once
    order = np.empty(n, dtype=np.int64)
    i = 0
    nxt_list = nxt.tolist()
    for k in range(n):
        order[k] = i
        i = nxt_list[i]
        if i < 0:
            return None
    if i != 0 or len(np.unique(order)) != n:
        return None  # several loops: the component has a hole
    pts = s[order]
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    corner = (d_in != d_out).any(axis=1)
    return pts[corner].reshape(-1).tolist()


def mask_to_polygons(mask: np.ndarray) -> list[list[int]] | None:
    """Exact COCO polygons (one per 4-connected component) of a bool mask ``[H, W]``, or ``None``.

    ``None`` when the mask is empty or some component cannot be written as one simple polygon.
    The polygons are verified to rasterise (pycocotools) back to ``mask`` exactly.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    labels, n = ndimage.label(mask)  # 4-connectivity (the default structure)
    polys: list[list[int]] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == k
        loop = _trace_component(comp)
        if loop is None or len(loop) < 8:
            return None
        oy, ox = sl[0].start, sl[1].start
        loop_arr = np.asarray(loop).reshape(-1, 2) + np.array([ox, oy])
        polys.append(loop_arr.reshape(-1).tolist())
    h, w = mask.shape
    back = decode_rles(mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in polys], h, w)))
    if not np.array_equal(back.astype(bool), mask):
        return None
    return polys
