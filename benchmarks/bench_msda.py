"""Benchmark: multi-scale deformable attention, ``ms_deform_attn`` (grid_sample) vs
``ms_deform_attn_reference`` (direct gather), forward and forward+backward, DINO-like shapes.

Shapes: 8 heads × 32 channels, 4 points, the 4 levels of a DINO-4scale model (strides 8..64) for an
``H×W`` input; ``--queries enc`` uses every token as a query (encoder self-attention), a number
uses that many queries (decoder cross-attention, 900 in DINO).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_msda.py --hw 800 1066 --queries 900
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mfdetr.ops import ms_deform_attn, ms_deform_attn_reference  # noqa: E402


def make_inputs(
    hw: tuple[int, int],
    queries: str,
    *,
    heads: int = 8,
    dh: int = 32,
    points: int = 4,
    strides: tuple[int, ...] = (8, 16, 32, 64),
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([(math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in strides], dtype=torch.long)
    s_total = int(shapes.prod(1).sum())
    nq = s_total if queries == "enc" else int(queries)
    value = torch.randn(1, s_total, heads, dh, generator=g)
    loc = torch.rand(1, nq, heads, len(strides), points, 2, generator=g) * 1.1 - 0.05  # some points outside
    attn = torch.rand(1, nq, heads, len(strides), points, generator=g)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, shapes, loc, attn


def timeit(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hw", type=int, nargs=2, default=(800, 1066), help="input image size (h w)")
    ap.add_argument("--queries", default="900", help="'enc' (all tokens) or a number of queries")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true", help="time only ms_deform_attn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    value, shapes, loc, attn = make_inputs(tuple(args.hw), args.queries)
    print(
        f"levels {shapes.tolist()}, tokens {value.shape[1]}, queries {loc.shape[1]}, heads 8x32, points 4, "
        f"threads {args.threads}"
    )
    impls = {"ms_deform_attn (grid_sample)": ms_deform_attn}
    if not args.skip_reference:
        impls["ms_deform_attn_reference (gather)"] = ms_deform_attn_reference
    outs = {}
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = timeit(lambda fn=fn: fn(value, shapes, loc, attn), args.repeat)
            outs[name] = fn(value, shapes, loc, attn)
        v, lo, a = (t.clone().requires_grad_(True) for t in (value, loc, attn))

        def fb(fn=fn, v=v, lo=lo, a=a) -> None:
            fn(v, shapes, lo, a).square().sum().backward()
            v.grad = lo.grad = a.grad = None

        fwbw = timeit(fb, args.repeat)
        print(f"{name:36s} forward {fwd * 1e3:9.1f} ms   forward+backward {fwbw * 1e3:9.1f} ms")
    if len(outs) == 2:
        a, b = outs.values()
        print(f"max |grid_sample - reference| = {float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main()
