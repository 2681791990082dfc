"""Hostile inputs built on the spot: extreme and huge-header images in a COCO split, and ground truth with
every kind of damaged instance (plus the same file without them, for pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: (height, width) of the extreme images every command must survive
EXTREMES = {"tall": (1500, 3), "wide": (3, 1500), "dot": (1, 1)}
#: headers declaring more pixels than are ever decoded (no pixel data behind them)
HUGE = {"huge": (20000, 20000), "bomb": (10000, 10000)}


def png_header_only(path: Path, h: int, w: int) -> Path:
    """A PNG whose header declares ``w × h`` RGB pixels, with a single row of data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * w)))
        + chunk(b"IEND", b"")
    )
    return path


def extreme_coco(root: Path, split: str, *, normal: int = 2, seed: int = 0) -> dict[str, int]:
    """A COCO split: ``normal`` ordinary images plus every extreme and huge one (one box instance each
    where there is room). Returns file stem → image id."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    sizes = {f"normal{k}": [(30, 44), (36, 52)][k % 2] for k in range(normal)}
    sizes.update(EXTREMES)
    images, anns, ids = [], [], {}
    for i, (stem, (h, w)) in enumerate([*sizes.items(), *HUGE.items()], start=1):
        if stem in HUGE:
            png_header_only(root / split / f"{stem}.png", h, w)
        else:
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / f"{stem}.png")
        ids[stem] = i
        images.append({"id": i, "file_name": f"{stem}.png", "height": h, "width": w})
        bw, bh = max(1, w // 2), max(1, h // 2)
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "iscrowd": 0,
                "area": float(bw * bh),
                "bbox": [0, 0, bw, bh],
                "segmentation": [[0, 0, bw, 0, bw, bh, 0, bh]],
            }
        )
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]})
    )
    return ids


def no_traceback(proc: Any) -> None:
    """Neither output of a command shows a traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def bad_instances(h: int, w: int, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One annotation per kind of damage (ids from ``first_id``; the last two have no integer id)."""
    base = {"image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 20.0, "bbox": [1, 1, 5, 4]}
    segs: list[Any] = [
        [[1.0, 1.0, 6.0, 5.0]],  # 4 numbers: pycocotools would read a box
        [[1.0, 1.0, 6.0, 1.0, 6.0]],  # odd length
        [[1.0, 1.0, 6.0, 1.0, float("nan"), 5.0]],  # non-finite
        [],  # no polygon
        {"size": [h, w], "counts": "zzzz~~~~garbage"},  # undecodable compressed counts
        {"size": [h, w], "counts": "1234567"},  # decodes, but not h*w pixels
        {"size": [h, w], "counts": [5, -3, h * w - 2]},  # negative count
        {"size": [h + 1, w], "counts": [(h + 1) * w]},  # size differs from the image
    ]
    out = [{**base, "id": first_id + k, "segmentation": s} for k, s in enumerate(segs)]
    good = [[1.0, 1.0, 6.0, 1.0, 6.0, 5.0, 1.0, 5.0]]
    n = first_id + len(out)
    out += [
        {**base, "id": n, "segmentation": good, "bbox": [1, 1, 0, 4]},  # zero width
        {**base, "id": n + 1, "segmentation": good, "bbox": [1, 1, -5, 4]},  # negative width
        {**base, "id": n + 2, "segmentation": good, "iscrowd": 2},
        {**base, "id": n + 3, "segmentation": good, "image_id": [image_id]},  # list-valued image id
        {**base, "id": "n4", "segmentation": good},  # non-integer ids
        {**base, "segmentation": good},
    ]
    return out


def damage_gt(path: Path) -> tuple[Path, set[int]]:
    """Add the bad instances of :func:`bad_instances` to every image of an annotation file; write the
    same file without them (what pycocotools is given directly). Returns (clean file, bad int ids)."""
    data = json.loads(path.read_text())
    clean = path.with_name(path.stem + "_clean.json")
    clean.write_text(json.dumps(data))
    next_id = max(a["id"] for a in data["annotations"]) + 1
    bad: list[dict[str, Any]] = []
    for im in data["images"]:
        bad += bad_instances(im["height"], im["width"], im["id"], next_id + len(bad))
    data["annotations"] += bad
    path.write_text(json.dumps(data))
    return clean, {a["id"] for a in bad if isinstance(a.get("id"), int)}


def pycocotools_stats(gt_file: Path, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    """pycocotools' six AP figures (x100, NaN where undefined) of ``results`` against ``gt_file``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dets = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v * 100) if v >= 0 else math.nan for v in ev.stats[:6]]
