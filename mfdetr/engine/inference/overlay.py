"""Overlay pictures of predictions, drawn with torchvision's ``draw_segmentation_masks`` and
``draw_bounding_boxes``.

Each instance is drawn as a translucent colour over its mask (alpha blending), a solid one-pixel
outline of the mask, its box (xywh in original pixels) and a label ``"<name> <score>"`` on a filled
tag just above the box's top-left corner (inside the box when the image has no room above). Colours are a fixed palette indexed by category id, so one category
has the same colour in every picture. Instances are painted in increasing score order, so the most
confident ones end up on top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["OverlayInstance", "category_color", "draw_overlay", "instances_from_results"]

#: distinct, saturated colours (Tableau-like), indexed by ``category_id % len(PALETTE)``
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


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
            rle = {
                "size": seg["size"],
                "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"],
            }
            mask = mask_util.decode(rle).astype(bool)
        cid = int(r["category_id"])
        x, y, w, h = (float(v) for v in r["bbox"])
        out.append(
            OverlayInstance(
                mask=mask,
                box_xywh=(x, y, w, h),
                label=names.get(cid, f"class {cid}"),
                score=float(r["score"]),
                category_id=cid,
            )
        )
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the image border)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _font_file() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def _ink(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Dark text on light colours, white on dark ones."""
    return (0, 0, 0) if sum(c * k for c, k in zip(color, (0.299, 0.587, 0.114), strict=True)) > 140 else (255, 255, 255)


def draw_overlay(image: Image.Image, instances: Sequence[OverlayInstance], *, alpha: float = 0.45) -> Image.Image:
    """A new RGB image of ``image``'s size with every instance drawn on it (see the module doc)."""
    pic = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    h, w = pic.shape[1:]
    order = sorted(instances, key=lambda t: t.score)
    if not order:
        return Image.fromarray(pic.permute(1, 2, 0).numpy(), mode="RGB")
    for inst in order:  # one call per instance: overlapping masks blend in turn, the most confident last
        if inst.mask is None:
            continue
        if inst.mask.shape != (h, w):
            raise ValueError(f"mask of shape {inst.mask.shape} for an image of {(h, w)}")
        color = category_color(inst.category_id)
        pic = draw_segmentation_masks(pic, torch.from_numpy(inst.mask), alpha=alpha, colors=color)
        pic = draw_segmentation_masks(pic, torch.from_numpy(_outline(inst.mask)), alpha=1.0, colors=color)
    colors = [category_color(t.category_id) for t in order]
    boxes = torch.tensor(
        [[x, y, x + max(bw, 1.0) - 1, y + max(bh, 1.0) - 1] for x, y, bw, bh in (t.box_xywh for t in order)]
    )
    pic = draw_bounding_boxes(pic, boxes, colors=colors, width=max(1, round(min(h, w) / 300)))
    # the "<name> <score>" tag: a filled label box above the box when there is room, else inside it,
    # in matplotlib's bundled DejaVu Sans at a size that follows the image
    font_file, font_size = _font_file(), max(9, min(16, round(min(h, w) / 30)))
    font = ImageFont.truetype(font_file, font_size)
    texts = [f"{t.label} {t.score:.2f}" for t in order]
    tags = []
    for text, (x, y, _, _) in zip(texts, (t.box_xywh for t in order), strict=True):
        left, top, right, bottom = font.getbbox(text)
        tw, th = right - left + 4, bottom - top + 4
        ty = y - th if y - th >= 0 else y
        tx = min(max(x, 0), max(w - tw, 0))
        tags.append([tx, ty, tx + tw, ty + th])
    pic = draw_bounding_boxes(
        pic,
        torch.tensor(tags),
        labels=texts,
        colors=colors,
        fill_labels=True,
        label_colors=[_ink(c) for c in colors],
        label_background_colors=colors,
        font=font_file,
        font_size=font_size,
    )
    return Image.fromarray(pic.permute(1, 2, 0).numpy(), mode="RGB")
