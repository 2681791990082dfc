"""A synthetic COCO-format instance-segmentation dataset (``mfdetr synth``).

Layout written (the COCO one, so every ``--coco DIR`` command reads it)::

    OUT/train2017/000000000001.jpg ...          JPEG, quality 90
    OUT/val2017/000001000001.jpg ...
    OUT/annotations/instances_train2017.json
    OUT/annotations/instances_val2017.json

Scenes (see :mod:`mfdetr.data.synth_render` for the 6 categories): a textured background, 0–7
objects from small to large (half-size log-uniform in ``[0.035, 0.35] × S``, one in four large in
``[0.4, 0.7] × S``, so COCO's small, medium and large buckets are all populated at S = 160),
centres of 30 % of the others up to 10 % outside the image (objects cut by the border), painted roughly back to front by
size so later (mostly smaller) objects occlude earlier ones, and, in some images, a
crowd region (a cluster of small same-class objects annotated once with ``iscrowd = 1``).
About 8 % of images have no object.

Annotations are of the **visible** part only: ``segmentation`` is an exact pixel-edge polygon list
for non-crowd instances (an RLE with string counts when a visible part has a hole), an uncompressed
RLE (counts list, like COCO) for crowds; ``bbox`` is the tight box of that mask and ``area`` its pixel
count; instances whose visible part is below ``min_area`` pixels are dropped.

Deterministic: image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``, so
it does not depend on the other options' values; the JSON is written with a fixed key order.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mfdetr.data.masks import mask_to_rle
from mfdetr.data.polygons import mask_to_polygons
from mfdetr.data.synth_render import (
    SYNTH_CLASSES,
    SynthClass,
    background,
    render_object,
)
from mfdetr.errors import MfdetrError

SPLITS = ("train2017", "val2017")
#: most categories ``--classes`` draws (each base shape with every texture)
MAX_CLASSES = len(SYNTH_CLASSES) ** 2
_ID_OFFSET = {"train2017": 0, "val2017": 1_000_000}


@dataclass(frozen=True)
class SynthConfig:
    """Options of the generator (the CLI's ``--train/--val/--image-size/--seed``)."""

    train: int = 200
    val: int = 50
    image_size: int = 160
    seed: int = 0
    max_objects: int = 7
    p_empty: float = 0.08
    p_crowd: float = 0.15
    min_area: int = 12
    jpeg_quality: int = 90
    #: categories drawn (the 6 shape/texture classes, then their variants with another texture and hue)
    num_classes: int = len(SYNTH_CLASSES)
    #: id of the first category; the others follow consecutively
    first_category_id: int = 1

    def __post_init__(self) -> None:
        if self.train < 0 or self.val < 0 or self.train + self.val == 0:
            raise MfdetrError(f"synth: need at least one image (--train {self.train} --val {self.val})")
        if not 32 <= self.image_size <= 4096:
            raise MfdetrError(f"synth: --image-size must be in 32..4096, got {self.image_size}")
        if self.seed < 0:
            raise MfdetrError(f"synth: --seed must be >= 0, got {self.seed}")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise MfdetrError(f"synth: --classes must be in 1..{MAX_CLASSES}, got {self.num_classes}")
        if self.first_category_id < 1:
            raise MfdetrError(f"synth: --first-category-id must be >= 1, got {self.first_category_id}")


def synth_classes(config: SynthConfig) -> tuple[SynthClass, ...]:
    """The categories of a dataset: class ``k`` has id ``first_category_id + k``; classes past the 6 base
    ones reuse a base shape with the next texture and a shifted hue (``disc-2``, ...)."""
    n = len(SYNTH_CLASSES)
    out = []
    for k in range(config.num_classes):
        base, rnd = SYNTH_CLASSES[k % n], k // n
        if rnd:
            base = dataclasses.replace(
                base,
                name=f"{base.name}-{rnd + 1}",
                texture=SYNTH_CLASSES[(k + rnd) % n].texture,
                hue=(base.hue + 0.5 * rnd) % 1.0,
            )
        out.append(dataclasses.replace(base, id=config.first_category_id + k))
    return tuple(out)


@dataclass
class SceneInstance:
    """One annotated region of a scene: category, crowd flag, visible mask ``[H, W]`` bool."""

    category_id: int
    iscrowd: bool
    mask: np.ndarray


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major run lengths starting with a 0-run), as COCO crowds use."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def image_size_for(config: SynthConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(H, W): shorter side S, aspect ratio in {1, 9/8, 5/4, 4/3}, landscape or portrait."""
    s = config.image_size
    long = int(round(s * float(rng.choice([1.0, 1.125, 1.25, 4 / 3]))))
    return (long, s) if rng.random() < 0.4 else (s, long)


def render_scene(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[SceneInstance]]:
    """One image ``[H, W, 3]`` uint8 and its visible-part instances (in painter's order)."""
    h, w = image_size_for(config, rng)
    s = float(config.image_size)
    img = background(h, w, rng)
    owner = np.full((h, w), -1, dtype=np.int32)
    groups: list[tuple[int, bool]] = []  # per owner id: (category id, iscrowd)
    n_obj = 0 if rng.random() < config.p_empty else int(rng.integers(1, config.max_objects + 1))
    crowd_at = int(rng.integers(0, n_obj + 1)) if n_obj and rng.random() < config.p_crowd else -1
    classes = synth_classes(config)

    def paint(cls_idx: int, cx: float, cy: float, a: float, gid: int) -> None:
        cls = classes[cls_idx]
        out = render_object(
            cls,
            cx=cx,
            cy=cy,
            a=a,
            aspect=float(rng.uniform(0.7, 1.0)),
            angle=float(rng.uniform(0, 2 * np.pi)),
            height=h,
            width=w,
            rng=rng,
        )
        if out is None:
            return
        rows, cols, m, rgb = out
        img[rows, cols][m] = rgb[m]
        owner[rows, cols][m] = gid

    # object sizes: half-size log-uniform in [0.035, 0.35] S, one in four large (0.4–0.7 S);
    # painted roughly back to front by size (larger ones mostly behind), so small ones occlude large
    sizes = [
        float(s * (rng.uniform(0.4, 0.7) if rng.random() < 0.25 else np.exp(rng.uniform(np.log(0.035), np.log(0.35)))))
        for _ in range(n_obj)
    ]
    depth = [a * float(rng.lognormal(0.0, 0.5)) for a in sizes]
    sizes = [sizes[j] for j in sorted(range(n_obj), key=lambda j: -depth[j])]
    for k in range(n_obj + 1):
        if k == crowd_at:  # a crowd: 5–9 small objects of one class clustered together
            cls_idx = int(rng.integers(len(classes)))
            gid = len(groups)
            groups.append((classes[cls_idx].id, True))
            ccx, ccy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            for _ in range(int(rng.integers(5, 10))):
                paint(
                    cls_idx,
                    ccx + rng.normal(0, 0.07 * s),
                    ccy + rng.normal(0, 0.07 * s),
                    float(s * rng.uniform(0.02, 0.045)),
                    gid,
                )
        if k < n_obj:
            cls_idx = int(rng.integers(len(classes)))
            gid = len(groups)
            groups.append((classes[cls_idx].id, False))
            if sizes[k] > 0.35 * s:
                lo, hi = 0.25, 0.75
            else:
                lo, hi = (-0.1, 1.1) if rng.random() < 0.3 else (0.05, 0.95)
            paint(cls_idx, rng.uniform(lo, hi) * w, rng.uniform(lo, hi) * h, sizes[k], gid)
    instances = []
    for gid, (cat, crowd) in enumerate(groups):
        vis = owner == gid
        if int(vis.sum()) >= config.min_area * (2 if crowd else 1):
            instances.append(SceneInstance(category_id=cat, iscrowd=crowd, mask=vis))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), instances


def instance_annotation(inst: SceneInstance, *, ann_id: int, image_id: int) -> dict[str, Any]:
    """COCO annotation of one visible mask: segmentation, tight bbox, pixel-count area."""
    m = inst.mask
    ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
    if inst.iscrowd:
        segm: Any = _uncompressed_rle(m)
    else:
        polys = mask_to_polygons(m)
        segm = polys if polys is not None else mask_to_rle(m)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.category_id,
        "segmentation": segm,
        "area": int(m.sum()),
        "bbox": bbox,
        "iscrowd": int(inst.iscrowd),
    }


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MfdetrError("output path exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise MfdetrError("output folder is not empty (use --force to overwrite it)", path=out)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
            (out / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)


def generate_synth(
    out: str | Path,
    *,
    config: SynthConfig | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out``; return a summary (per split: images, instances, ...).

    Raises:
        MfdetrError: ``out`` is a non-empty folder and ``force`` is false, or bad options.
    """
    config = config or SynthConfig()
    out = Path(out)
    _prepare_out(out, force)
    categories = [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in synth_classes(config)]
    summary: dict[str, Any] = {"out": str(out), "config": asdict(config), "splits": {}}
    for split_idx, (split, n) in enumerate(zip(SPLITS, (config.train, config.val), strict=True)):
        images, anns = [], []
        stats = {"images": n, "instances": 0, "crowd": 0, "empty_images": 0, "rle_non_crowd": 0}
        for i in range(n):
            rng = np.random.default_rng([config.seed, split_idx, i])
            pixels, instances = render_scene(config, rng)
            image_id = _ID_OFFSET[split] + i + 1
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(out / split / file_name, quality=config.jpeg_quality)
            images.append(
                {"id": image_id, "file_name": file_name, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}
            )
            for inst in instances:
                ann = instance_annotation(inst, ann_id=len(anns) + 1, image_id=image_id)
                anns.append(ann)
                stats["crowd"] += ann["iscrowd"]
                stats["rle_non_crowd"] += int(not ann["iscrowd"] and isinstance(ann["segmentation"], dict))
            stats["instances"] += len(instances)
            stats["empty_images"] += int(not instances)
            if progress is not None:
                progress(split, i + 1, n)
        data = {
            "info": {
                "description": "mfdetr synthetic COCO-format instance segmentation",
                "version": "1",
                "seed": config.seed,
                "image_size": config.image_size,
            },
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, separators=(",", ":")))
        summary["splits"][split] = stats
    return summary
