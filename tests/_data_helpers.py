"""Tiny hand-made COCO folders for the data / evaluation tests (a few pixels, a few instances)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "square", "supercategory": "shape"}, {"id": 3, "name": "bar", "supercategory": "shape"}]


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def square_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco(
    root: Path,
    split: str,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
) -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": categories if categories is not None else CATEGORIES,
            }
        )
    )
    return path


def make_tiny_coco(root: Path, split: str = "val2017") -> Path:
    """Three 30×40 images: id 1 (JPEG, 4 annotations incl. a crowd and 2 degenerate ones), id 2 (PNG
    grayscale, 1 instance), id 3 (JPEG, no annotations). Returns the annotation file path."""
    (root / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_array(30, 40, 1)).save(root / split / "a.jpg", quality=90)
    Image.fromarray(rgb_array(30, 40, 2)[..., 0], mode="L").save(root / split / "b.png")
    Image.fromarray(rgb_array(30, 40, 3)).save(root / split / "c.jpg", quality=90)
    images = [
        {"id": i, "file_name": f, "height": 30, "width": 40} for i, f in ((1, "a.jpg"), (2, "b.png"), (3, "c.jpg"))
    ]
    crowd = np.zeros((30, 40), dtype=np.uint8)
    crowd[20:28, 25:39] = 1
    counts: list[int] = []  # uncompressed (column-major) RLE, as COCO writes crowd regions
    flat = crowd.flatten(order="F")
    val, run = 0, 0
    for v in flat:
        if v == val:
            run += 1
        else:
            counts.append(run)
            val, run = v, 1
    counts.append(run)
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [square_polygon(2, 3, 12, 15)],
            "bbox": [2, 3, 10, 12],
            "area": 120.0,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "segmentation": {"size": [30, 40], "counts": counts},
            "bbox": [25, 20, 14, 8],
            "area": 112.0,
            "iscrowd": 1,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[5.0, 5.0, 9.0, 9.0]],  # 2 points
            "bbox": [5, 5, 4, 4],
            "area": 0.0,
            "iscrowd": 0,
        },
        {
            "id": 4,
            "image_id": 1,
            "category_id": 3,
            "segmentation": [square_polygon(20, 2, 20, 9)],  # zero area
            "bbox": [20, 2, 0, 7],
            "area": 0.0,
            "iscrowd": 0,
        },
        {
            "id": 5,
            "image_id": 2,
            "category_id": 3,
            "segmentation": [square_polygon(0, 10, 40, 20)],
            "bbox": [0, 10, 40, 10],
            "area": 400.0,
            "iscrowd": 0,
        },
    ]
    return write_coco(root, split, images, anns)
