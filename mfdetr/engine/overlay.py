"""Overlay pictures of predictions with Pillow only (no matplotlib / OpenCV).

Each instance is drawn as a translucent colour over its mask (alpha blending), a solid one-pixel
outline of the mask, its box (xywh in original pixels) and a label ``"<name> <score>"`` on a filled
tag at the box's top-left corner. Colours are a fixed palette indexed by category id, so one category
has the same colour in every picture. Instances are painted in increasing score order, so the most
confident ones end up on top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["OverlayInstance", "category_color", "draw_overlay", "instances_from_results"]

#: distinct, saturated colours (Tableau-like), indexed by ``category_id % len(PALETTE)``
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128))


def category_color(category_id: int) -> tuple[int, int, int]:
    """The palette colour of a category id (stable across pictures)."""
    return PALETTE[int(category_id) % len(PALETTE)]


@dataclass(frozen=True)
class OverlayInstance:
    """One instance to draw.

    - ``mask``: [H, W] bool in original image pixels (``None``: box only);
    - ``box_xywh``: (x, y, w, h) in original image pixels;
    - ``label``: text shown on the tag (category name); ``score``: in [0, 1];
    - ``category_id``: picks the colour.
    """

    mask: np.ndarray | None
    box_xywh: tuple[float, float, float, float]
    label: str
    score: float
    category_id: int


def instances_from_results(results: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> list[OverlayInstance]:
    """COCO results of one image (``bbox``, ``score``, ``category_id``, RLE ``segmentation``) → instances."""
    import pycocotools.mask as mask_util

    out = []
    for r in results:
        seg = r.get("segmentation")
        mask = None
        if seg is not None:
            rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str)
                   else seg["counts"]}
            mask = mask_util.decode(rle).astype(bool)
        cid = int(r["category_id"])
        x, y, w, h = (float(v) for v in r["bbox"])
        out.append(OverlayInstance(mask=mask, box_xywh=(x, y, w, h), label=names.get(cid, f"class {cid}"),
                                   score=float(r["score"]), category_id=cid))
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the image border)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def draw_overlay(image: Image.Image, instances: Sequence[OverlayInstance], *, alpha: float = 0.45) -> Image.Image:
    """A new RGB image of ``image``'s size with every instance drawn on it (see the module doc)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    h, w = base.shape[:2]
    order = sorted(instances, key=lambda t: t.score)
    for inst in order:
        if inst.mask is None:
            continue
        if inst.mask.shape != (h, w):
            raise ValueError(f"mask of shape {inst.mask.shape} for an image of {(h, w)}")
        color = np.asarray(category_color(inst.category_id), dtype=np.float32)
        m = inst.mask
        base[m] = base[m] * (1.0 - alpha) + color * alpha
        base[_outline(m)] = color
    out = Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(h, w) / 300))
    font = _font(max(9, min(16, round(min(h, w) / 30))))
    for inst in order:
        color = category_color(inst.category_id)
        x, y, bw, bh = inst.box_xywh
        draw.rectangle([x, y, x + max(bw, 1.0) - 1, y + max(bh, 1.0) - 1], outline=color, width=line)
        text = f"{inst.label} {inst.score:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l + 4, b - t + 2
        ty = y - th if y - th >= 0 else y  # above the box when there is room, else inside it
        tx = min(max(x, 0), max(w - tw, 0))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        # dark text on light colours, white on dark ones
        ink = (0, 0, 0) if sum(c * k for c, k in zip(color, (0.299, 0.587, 0.114), strict=True)) > 140 else (
            255, 255, 255)
        draw.text((tx + 2 - l, ty + 1 - t), text, fill=ink, font=font)
    return out
