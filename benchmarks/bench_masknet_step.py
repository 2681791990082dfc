"""MaskNet training step on a cache: all K queries (before) vs the positives only (after), in one run.

For each assignment (box IoU ≥ 0.5, Hungarian) the all-K step is timed once (a cap does not change
its cost), then the positives-only step for each cap on positives per image (``none`` and e.g. 64, 32,
16). A step is MaskNet forward + loss + backward + AdamW update on batches preloaded on the device
(no data loading), starting from the same initial weights. Printed per row: positives per image as
assigned and as trained on (after the cap), seconds per step, the speed-up over all-K, and the
first-step loss difference between the two paths at the same cap (0 up to float rounding: the
positives-only path is exact).

    python benchmarks/bench_masknet_step.py --cache mfdetr-demo/cache/train2017 --coco mfdetr-demo/synth
    python benchmarks/bench_masknet_step.py --cache CACHE --coco COCO --device cuda --caps none 64 32 16 \\
        --config pipeline/recipes/dino_focal.toml
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_batches(args: argparse.Namespace, enc_layer: int, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
    from mfdetr.engine.cache_data import CacheDataset, open_annotations, open_cache
    from mfdetr.engine.collate import collate_detector_outputs

    store = open_cache(args.cache, enc_layer=enc_layer, role="benchmark cache")
    ds = CacheDataset(
        store=store, coco_split=open_annotations(store, coco=args.coco), enc_layer=enc_layer, max_images=args.images
    )
    n = len(ds)
    out = []
    for s in range(max(1, n // args.batch_size)):
        items = [ds[(s * args.batch_size + j) % n] for j in range(args.batch_size)]
        out.append(collate_detector_outputs(items).to(device))
    return out, store.manifest


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(
    model0: torch.nn.Module,
    crit: Any,
    batches: list[Any],
    *,
    positives: bool,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Time ``steps`` training steps (after ``warmup``) of a copy of ``model0`` on one path."""
    from mfdetr.masknet.positives import PositivesOnly

    model = copy.deepcopy(model0).train()
    fwd = PositivesOnly(model, crit) if positives else model
    from mfdetr.engine.optim import make_adamw

    opt = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=5e-5)
    amp = device.type == "cuda"
    first, pos, t0 = float("nan"), [], 0.0
    for s in range(warmup + steps):
        if s == warmup:
            sync(device)
            t0 = time.perf_counter()
        batch = batches[s % len(batches)]
        torch.manual_seed(s)  # the same point-sampling draws on both paths
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = fwd(batch.det, batch.targets, step=s) if positives else fwd(batch.det)
            losses = crit(out, batch.det, batch.targets, step=s)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if s == 0:
            first = float(losses["loss"].detach())
        pos.append(float(losses["pos_per_image"]))
    sync(device)
    return {"s_per_step": (time.perf_counter() - t0) / steps, "first_loss": first, "pos_per_image": sum(pos) / len(pos)}


def assigned_per_image(crit: Any, batches: list[Any]) -> float:
    from mfdetr.masknet.targets import assign

    n = sum(len(assign(b.det, b.targets, crit.assign_cfg, crit.class_to_category)) for b in batches)
    return n / sum(len(b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a training cache (e.g. the demo's train2017 cache)")
    ap.add_argument("--coco", default=None, help="its COCO folder (default: where `mfdetr cache` recorded it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--images", type=int, default=16, help="images preloaded (cycled through)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["box_iou", "hungarian"], choices=["box_iou", "hungarian"])
    ap.add_argument("--caps", nargs="+", default=["none", "64", "32", "16"], help="positives per image ('none')")
    ap.add_argument("--config", default=None, help="run recipe TOML (its [masknet]/[loss]/[assign] are used)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    args = ap.parse_args()
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.stage2 import build_parts, resolve_masknet_config

    device = torch.device(args.device)
    caps = [0 if c.lower() in ("none", "0") else int(c) for c in args.caps]
    base = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    batches, manifest = load_batches(args, resolve_masknet_config(base).enc_layer, device)
    print(
        f"cache {args.cache}: {len(batches)} batches of {args.batch_size} preloaded on {device}; "
        f"{args.steps} timed steps after {args.warmup} warm-up; MaskNet K={resolve_masknet_config(base).num_queries}"
    )
    print(
        f"{'assign':<10}{'cap':>6}{'assigned/img':>14}{'trained/img':>13}{'s/step':>10}{'speed-up':>10}"
        f"{'|dloss| step 0':>16}"
    )
    for method in args.methods:
        rows = []
        for cap in caps:
            sets = [*args.set, f"assign.method={method}", f"assign.max_positives_per_image={cap}"]
            cfg = load_run_config(args.config, sets) if args.config else build_run_config({}, sets)
            parts = build_parts(cfg, manifest)
            model0, crit = parts.model.to(device), parts.criterion.to(device)
            if not rows:  # all-K once per assignment (a cap does not change its cost)
                full = run_path(
                    model0, crit, batches, positives=False, steps=args.steps, warmup=args.warmup, device=device
                )
                rows.append(
                    ("all-K", assigned_per_image(crit, batches), full["pos_per_image"], full["s_per_step"], 1.0, 0.0)
                )
            else:  # the first-step loss of all-K at this cap (one untimed step)
                full = run_path(model0, crit, batches, positives=False, steps=1, warmup=0, device=device)
            pos = run_path(model0, crit, batches, positives=True, steps=args.steps, warmup=args.warmup, device=device)
            rows.append(
                (
                    str(cap or "none"),
                    assigned_per_image(crit, batches),
                    pos["pos_per_image"],
                    pos["s_per_step"],
                    rows[0][3] / pos["s_per_step"],
                    abs(pos["first_loss"] - full["first_loss"]),
                )
            )
        for cap_s, assigned, trained, sps, ratio, dloss in rows:
            print(f"{method:<10}{cap_s:>6}{assigned:>14.1f}{trained:>13.1f}{sps:>10.3f}{ratio:>9.2f}x{dloss:>16.2e}")


if __name__ == "__main__":
    main()
