"""The MaskNet training step of this tree against another checkout of the project (e.g. the code before
positives-only training), on the same preloaded cache batches, in turn, in one run.

The batches are read once by this tree and saved as plain tensors; each measurement then runs in a child
process whose ``PYTHONPATH`` is one tree, so each side imports only its own code. A step is MaskNet forward
+ losses + backward + AdamW (fused where the tree's trainer fuses it) on the preloaded batches (no data
loading), from the same seeded initial weights.
The other tree runs its plain all-K step (``model(det)``; an older tree has nothing else); this tree runs the
positives-only step (``PositivesOnly``) for each assignment and cap. Printed per row: positives per image
trained on, the median and min seconds per step, the ratio of the other tree's median to this one's, and the
first-step loss of each side (equal up to float rounding where the cap keeps every positive).

    git worktree add /tmp/before fcf1443
    python benchmarks/bench_step_trees.py --other /tmp/before --cache mfdetr-demo/cache/train2017 --rounds 2
    python benchmarks/bench_step_trees.py --other /tmp/before --cache mfdetr-demo/cache/train2017 \
        --val-cache mfdetr-demo/cache/val2017 --other-caches OLD_TRAIN OLD_VAL --stage2 200 --caps 8 --methods box_iou

``--stage2 N`` times whole stage-2 runs of the demo recipe instead (data loading, N steps, one evaluation), the
other tree on its own caches of the same images (``mfdetr cache`` of that tree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parents[1]

#: the demo's MaskNet recipe (`mfdetr demo`)
DEMO = [
    "masknet.num_queries=20",
    "masknet.enc_layer=2",
    "masknet.roi_size=16",
    "masknet.image_encoder.layers=1",
    "masknet.box_encoder.layers=1",
    "masknet.box_encoder.dim=32",
    "masknet.box_encoder.heads=4",
    "masknet.mask_scoring.channels=32",
    "masknet.mask_scoring.fc_dim=64",
]


def dump(cache: str, out: Path, images: int, batch_size: int, enc_layer: int) -> int:
    """Read ``images`` cache images with this tree (as ``bench_masknet_step`` does), collate batches and save
    them as plain tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_masknet_step import load_batches

    spec = argparse.Namespace(cache=cache, coco=None, images=images, batch_size=batch_size)
    batches, manifest = load_batches(spec, enc_layer, torch.device("cpu"))
    plain = []
    for b in batches:
        det = {f.name: getattr(b.det, f.name) for f in dataclasses.fields(b.det) if f.name != "extras"}
        plain.append({"det": det, "targets": [dataclasses.asdict(t) for t in b.targets]})
    torch.save({"batches": plain, "manifest": dict(manifest)}, out)
    return len(plain)


def time_steps(blob_path: str, sets: list[str], positives: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Child side: time the step of the tree on ``sys.path`` (positives-only or all-K)."""
    from mfdetr.contracts import DetectorOutput, GTInstances
    from mfdetr.engine.config import build_run_config
    from mfdetr.engine.stage2 import build_parts

    blob = torch.load(blob_path, weights_only=True)
    batches = [(DetectorOutput(**b["det"]), [GTInstances(**t) for t in b["targets"]]) for b in blob["batches"]]
    parts = build_parts(build_run_config({}, sets), blob["manifest"])
    torch.manual_seed(0)
    model, crit = parts.model.train(), parts.criterion
    fwd: Any = model
    if positives:
        from mfdetr.masknet.positives import PositivesOnly

        fwd = PositivesOnly(model, crit)
    try:  # the tree's own optimizer (fused AdamW where it has one)
        from mfdetr.engine.optim import make_adamw
    except ImportError:
        make_adamw = torch.optim.AdamW
    opt = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=5e-5)
    times, first, pos = [], float("nan"), []
    for s in range(warmup + steps):
        det, gts = batches[s % len(batches)]
        torch.manual_seed(s)
        t0 = time.perf_counter()
        out = fwd(det, gts, step=s) if positives else fwd(det)
        try:
            losses = crit(out, det, gts, step=s)
        except TypeError:  # a tree whose criterion takes no step
            losses = crit(out, det, gts)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        dt = time.perf_counter() - t0
        first = float(losses["loss"].detach()) if s == 0 else first
        if s >= warmup:
            times.append(dt)
        pos.append(float(losses["pos_per_image"] if "pos_per_image" in losses else losses["num_pos"] / len(gts)))
    return {
        "median": statistics.median(times),
        "min": min(times),
        "first_loss": first,
        "pos_per_image": sum(pos) / len(pos),
    }


def stage2(cache: str, val_cache: str, out: str, sets: list[str]) -> dict[str, Any]:
    """Child side: a whole stage-2 run of the tree on ``sys.path`` (data loading, steps, evaluation)."""
    from mfdetr.engine.config import build_run_config
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    cfg = build_run_config({}, sets)
    t0 = time.perf_counter()
    _, metrics = train_from_cache(
        cfg, CacheSources(cache=Path(cache), coco=None, val_cache=Path(val_cache)), out, log=lambda _: None
    )
    return {"seconds": time.perf_counter() - t0, "segm_AP": metrics["segm"]["AP"]}


def measure(
    tree: Path, blob: Path, sets: list[str], positives: bool, steps: int, warmup: int, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run :func:`time_steps` (or, with ``extra``, :func:`stage2`) in a child process importing ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(blob),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        *(["--positives"] if positives else []),
        *extra,
        "--set",
        *sets,
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"measurement in {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def whole_runs(args: argparse.Namespace, sets: list[str]) -> None:
    """``--stage2 N``: the demo recipe's stage 2 (N steps, batch 8, evaluated once) in each tree, in turn."""
    if not args.val_cache:
        raise SystemExit("--stage2 needs --val-cache")
    n = args.stage2
    run = [
        "train.batch_size=8",
        "train.lr=3e-4",
        "train.seed=0",
        "train.num_workers=0",
        "train.checkpoint_every=0",
        f"train.iterations={n}",
        f"train.eval_every={n}",
        f"train.log_every={n}",
        "train.progress=false",
    ]
    print(f"stage 2, demo recipe, {n} steps + one evaluation, {args.rounds} round(s) in turn; other tree {args.other}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for cap in args.caps:
                c = 0 if cap.lower() in ("none", "0") else int(cap)
                for r in range(args.rounds):
                    for name, tree, extra, caches in (
                        ("other", Path(args.other), [], args.other_caches or [args.cache, args.val_cache]),
                        ("this", HERE, [f"assign.max_positives_per_image={c}"], [args.cache, args.val_cache]),
                    ):
                        out = Path(tmp) / f"{name}-{method}-{cap}-{r}"
                        res = measure(
                            tree,
                            Path(tmp),
                            [*sets, *run, f"assign.method={method}", *extra],
                            False,
                            0,
                            0,
                            extra=("--child-stage2", *caches, str(out)),
                        )
                        print(
                            f"{method:<10} cap {cap:>5} round {r + 1} {name:<6} {res['seconds']:8.1f} s   "
                            f"mask AP {res['segm_AP']:.2f}"
                        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", help="the other checkout (its root folder)")
    ap.add_argument("--cache", help="a training cache (e.g. the demo's train2017 cache)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every measurement, in turn")
    ap.add_argument("--methods", nargs="+", default=["box_iou", "hungarian"], choices=["box_iou", "hungarian"])
    ap.add_argument("--caps", nargs="+", default=["none", "8", "4"], help="positives per image ('none')")
    ap.add_argument("--set", nargs="*", default=None, help="recipe overrides (default: the demo's MaskNet)")
    ap.add_argument(
        "--stage2",
        type=int,
        default=0,
        metavar="N",
        help="instead: a whole demo-recipe stage-2 run of N steps (evaluated once, on --val-cache) per tree",
    )
    ap.add_argument("--val-cache", default=None, help="the validation cache of --stage2")
    ap.add_argument(
        "--other-caches",
        nargs=2,
        default=None,
        metavar=("TRAIN", "VAL"),
        help="--stage2: the other tree's own train and val caches of the same images (an older tree "
        "may not read this tree's store format)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-stage2", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--positives", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sets = DEMO if args.set is None else args.set
    if args.child_stage2:
        print(json.dumps(stage2(*args.child_stage2, sets)))
        return
    if args.child:
        print(json.dumps(time_steps(args.child, sets, args.positives, args.steps, args.warmup)))
        return
    if not args.other or not args.cache:
        ap.error("--other and --cache are required")
    if args.stage2:
        return whole_runs(args, sets)
    enc_layer = next((int(s.split("=")[1]) for s in sets if s.startswith("masknet.enc_layer=")), 4)
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "batches.pt"
        n = dump(args.cache, blob, args.images, args.batch_size, enc_layer)
        print(
            f"{n} batches of {args.batch_size} from {args.cache}; {args.steps} timed steps after {args.warmup} "
            f"warm-up, {args.rounds} round(s); other tree {args.other}"
        )
        print(
            f"{'assign':<10}{'cap':>6}{'pos/img':>9}{'other s/step':>14}{'this s/step':>13}{'other/this':>12}"
            f"{'loss other':>12}{'loss this':>11}"
        )
        for method in args.methods:
            other: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                other.append(
                    measure(Path(args.other), blob, [*sets, f"assign.method={method}"], False, args.steps, args.warmup)
                )
            for cap in args.caps:
                c = 0 if cap.lower() in ("none", "0") else int(cap)
                this = [
                    measure(
                        HERE,
                        blob,
                        [*sets, f"assign.method={method}", f"assign.max_positives_per_image={c}"],
                        True,
                        args.steps,
                        args.warmup,
                    )
                    for _ in range(args.rounds)
                ]
                o = statistics.median(r["median"] for r in other)
                t = statistics.median(r["median"] for r in this)
                print(
                    f"{method:<10}{cap:>6}{this[0]['pos_per_image']:>9.1f}{o:>14.3f}{t:>13.3f}{o / t:>11.2f}x"
                    f"{other[0]['first_loss']:>12.5f}{this[0]['first_loss']:>11.5f}"
                )


if __name__ == "__main__":
    main()
