"""Benchmark of COCO evaluation: pycocotools vs faster-coco-eval (``--evaluator faster``), side by side.

Prints (not pass/fail), per IoU type: each evaluator's AP, AP50, AP75, the largest difference between
them over the six COCO numbers (the faster evaluator is offered because it stays within 0.01 AP), the
best-of-N wall time of each and the speed ratio pycocotools / faster; and the time of Boundary AP
(faster-coco-eval only: pycocotools has no boundary IoU).

By default it scores the demo's validation set — ``mfdetr synth`` with the demo's 100 val images at
160 px — against its own GT turned into predictions and perturbed (masks eroded or shifted, boxes
jittered, random scores, a few spurious detections), which has the size and shape of the demo's
``val_results.json``. With a real run::

    python benchmarks/bench_eval.py --coco mfdetr-demo/synth --results mfdetr-demo/run/val_results.json

Time it on an idle machine: numbers taken while other jobs share the cores are not comparable.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from mfdetr.data.synth import SynthConfig, generate_synth
from mfdetr.evaluation import (
    METRIC_NAMES,
    annotation_path,
    evaluate,
    gt_to_results,
    load_coco_gt,
    mask_to_rle,
    read_results_json,
)


def perturbed_predictions(coco_gt: Any, seed: int, spurious: float = 0.3) -> list[dict[str, Any]]:
    """The GT as predictions, each mask eroded or shifted, boxes jittered, random scores, plus spurious ones."""
    rng = np.random.default_rng(seed)
    gt = gt_to_results(coco_gt)
    out = []
    for r in copy.deepcopy(gt):
        m = mask_utils.decode(r["segmentation"]).astype(bool)
        m = (
            ndimage.binary_erosion(m, iterations=1)
            if rng.random() < 0.5
            else np.roll(m, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), (0, 1))
        )
        if not m.any():
            continue
        x, y, w, h = r["bbox"]
        out.append(
            {
                **r,
                "segmentation": mask_to_rle(m),
                "score": float(rng.uniform(0.05, 1.0)),
                "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.8, 1.2), h],
            }
        )
    for r in rng.choice(np.array(gt, dtype=object), size=int(spurious * len(gt)), replace=True):
        m = np.roll(mask_utils.decode(r["segmentation"]).astype(bool), (int(rng.integers(10, 40)),) * 2, (0, 1))
        if m.any():
            ys, xs = np.nonzero(m)
            out.append(
                {
                    **r,
                    "segmentation": mask_to_rle(m),
                    "score": float(rng.uniform(0.0, 0.5)),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                }
            )
    return out


def best_of(n: int, fn: Callable[[], dict[str, float]]) -> tuple[float, dict[str, float]]:
    times, out = [], {}
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", type=Path, help="COCO folder (default: a fresh synthetic demo-like val set)")
    ap.add_argument("--split", default="val2017")
    ap.add_argument("--results", type=Path, help="COCO results JSON (default: perturbed GT)")
    ap.add_argument("--val", type=int, default=100, help="synthetic val images (the demo's 100)")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        coco = args.coco
        if coco is None:
            coco = Path(tmp) / "synth"
            generate_synth(coco, config=SynthConfig(train=1, val=args.val, image_size=args.image_size, seed=0))
        gt = load_coco_gt(annotation_path(coco, args.split))
        types = ("segm", "bbox")
        if args.results is not None:
            res = read_results_json(args.results, gt, ["segm"])
            types = ("segm", "bbox") if all("bbox" in r for r in res) else ("segm",)
        else:
            res = perturbed_predictions(gt, seed=0)
        print(f"{len(res)} detections on {len(gt.imgs)} images; best of {args.repeats} runs each")
        print(
            f"{'iou_type':<9}{'evaluator':<13}"
            + "".join(f"{m:>8}" for m in METRIC_NAMES[:3])
            + f"{'max|Δ|':>9}{'time s':>9}{'ratio':>8}"
        )
        for t in types:
            t_ref, ref = best_of(args.repeats, lambda t=t: evaluate(gt, res, t))
            t_fast, fast = best_of(args.repeats, lambda t=t: evaluate(gt, res, t, evaluator="faster"))
            diff = max((abs(fast[k] - ref[k]) for k in METRIC_NAMES if not np.isnan(ref[k])), default=0.0)
            print(row(t, "pycocotools", ref, "", t_ref, ""))
            print(row(t, "faster", fast, f"{diff:.4f}", t_fast, f"{t_ref / t_fast:.1f}x" if t_fast > 0 else "inf"))
        t_b, b = best_of(args.repeats, lambda: evaluate(gt, res, "boundary"))
        print(row("boundary", "faster", b, "", t_b, ""))


def row(iou_type: str, evaluator: str, ap: dict[str, float], diff: str, sec: float, ratio: str) -> str:
    return (
        f"{iou_type:<9}{evaluator:<13}"
        + "".join(f"{ap[m]:8.2f}" for m in METRIC_NAMES[:3])
        + f"{diff:>9}{sec:9.3f}{ratio:>8}"
    )


if __name__ == "__main__":
    main()
