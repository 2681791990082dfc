"""Benchmark: a full ``dino_r50`` forward (``detect``: backbone, encoder, decoder, top-100) on CPU.

Random weights unless ``--checkpoint`` is given (the cost does not depend on the values). Reports
seconds per image and the peak resident memory of the process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_dino.py --hw 800 1066 --repeat 2
"""

from __future__ import annotations

import argparse
import resource
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mfdetr.contracts import ImageBatch  # noqa: E402
from mfdetr.detectors import build_detector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dino_r50")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--hw", type=int, nargs=2, default=(800, 1066), help="network input size (h w)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    det = build_detector(args.preset, checkpoint=args.checkpoint)
    h, w = args.hw
    hw = torch.tensor([[h, w]] * args.batch)
    batch = ImageBatch(
        images=torch.randn(args.batch, 3, h, w),
        pad_mask=torch.zeros(args.batch, h, w, dtype=torch.bool),
        input_hw=hw,
        orig_hw=hw,
        image_ids=list(range(args.batch)),
        file_names=[""] * args.batch,
    )
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    det.detect(batch, topk=100, enc_layers=(4,))  # warm-up
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        out = det.detect(batch, topk=100, enc_layers=(4,))
    per_image = (time.perf_counter() - t0) / (args.repeat * args.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.preset} {h}x{w} batch {args.batch}, threads {args.threads}: {per_image:.2f} s/image "
        f"(first call {first:.2f} s); peak RSS {peak:.0f} MiB (after build {rss_built:.0f} MiB); "
        f"queries {tuple(out.queries.shape)}, enc levels {[tuple(m.shape[-2:]) for m in out.enc_maps[4]]}"
    )


if __name__ == "__main__":
    main()
