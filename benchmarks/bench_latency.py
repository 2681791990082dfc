"""Benchmark: warm per-image time of the inference path by stage (preprocess, detector, MaskNet,
post-processing) for a detector preset at a given image size (synthetic images unless files are given).

The detector has random weights unless ``--checkpoint`` is given or the preset ships weights (the cost
does not depend on the values); the MaskNet is ``--masknet`` or the default recipe with random weights.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_latency.py --preset dino_r50 --size 800x1333
    python benchmarks/bench_latency.py --preset dino_focal --size 800x1333 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mfdetr.engine.inference.latency import benchmark_predict, format_report, parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="*", help="image files/folders (default: synthetic images of --size)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--masknet", default=None, help="a MaskNet run's ckpt.pt (default: random default recipe)")
    ap.add_argument("--size", default="800x1333", help="synthetic image HxW")
    ap.add_argument("--num-images", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = benchmark_predict(
        detector=args.preset,
        masknet=args.masknet,
        checkpoint=args.checkpoint,
        inputs=args.inputs,
        size=parse_size(args.size),
        num_images=args.num_images,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        random_weights=True,
    )
    print(format_report(report, title=f"bench_latency ({args.preset}, images {args.size})"))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")


if __name__ == "__main__":
    main()
