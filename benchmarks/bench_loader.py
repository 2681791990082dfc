"""Is loading the bottleneck? Images/s the stage-2 DataLoader delivers vs images/s the MaskNet step consumes.

For each cache given (e.g. a ``--c1 store`` and a ``--c1 recompute`` cache of the same split), in one run:

- **loader**: the training DataLoader over the cache exactly as ``mfdetr train`` builds it
  (:class:`~mfdetr.engine.cache_data.CacheDataset`, :func:`~mfdetr.engine.loading.loader_options`:
  forkserver/spawn workers, each opening the store itself, persistent, prefetching), no model: images/s
  delivered after ``--warmup`` batches (worker start-up excluded), for every ``--workers`` count. For a
  recompute cache this includes reading, sha256-checking, decoding and preprocessing the image;
- **consumer**: the MaskNet training step (forward, losses, backward, AdamW) on batches already in
  memory, images/s. For a recompute cache the stage-0 forward that rebuilds C1 on the training device
  runs in the step (the trainer's ``prepare_batch``), so its time counts on the consumer side.

Prints both and their ratio (the goal: loader ≥ 3× consumer). It measures; it does not judge.

    python benchmarks/bench_loader.py --cache cache/demo/train2017 --cache cache/demo_recompute/train2017 \
        --config pipeline/recipes/demo.toml --workers 0 2 4 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _dataset(cache: str, coco: str | None, enc_layer: int) -> Any:
    from mfdetr.engine.cache_data import CacheDataset, open_annotations, open_cache

    store = open_cache(cache, enc_layer=enc_layer)
    return CacheDataset(store=store, coco_split=open_annotations(store, coco=coco), enc_layer=enc_layer)


def loader_rate(ds: Any, *, workers: int, batch_size: int, batches: int, warmup: int, prefetch: int) -> float:
    """Images/s delivered by the DataLoader (after ``warmup`` batches), cycling over the dataset."""
    from mfdetr.engine.collate import collate_detector_outputs
    from mfdetr.engine.loading import loader_options

    n = len(ds)
    order = [[(b * batch_size + j) % n for j in range(batch_size)] for b in range(warmup + batches)]
    loader = DataLoader(
        ds, batch_sampler=order, collate_fn=collate_detector_outputs, **loader_options(workers, prefetch)
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    images = sum(len(next(it)) for _ in range(batches))
    dt = time.perf_counter() - t
    del it, loader
    return images / dt


def consumer_rate(ds: Any, cfg: Any, *, device: torch.device, batch_size: int, steps: int, warmup: int) -> float:
    """Images/s of MaskNet training steps on in-memory batches (recompute: stage 0 included)."""
    from mfdetr.engine.collate import collate_detector_outputs
    from mfdetr.engine.stage2 import build_parts
    from mfdetr.engine.trainer import amp_settings

    parts = build_parts(cfg, ds.store.manifest)
    model, crit = parts.model.to(device).train(), parts.criterion.to(device)
    from mfdetr.engine.optim import make_adamw

    opt = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=5e-5)
    use_amp, amp_dtype = amp_settings(cfg.train.amp, device)
    n = len(ds)
    cpu_batches = [
        collate_detector_outputs([ds[(b * batch_size + j) % n] for j in range(batch_size)])
        for b in range(min(warmup + steps, max(1, -(-n // batch_size))))
    ]
    prepare = ds.prepare_batch

    def one(s: int) -> int:
        batch = cpu_batches[s % len(cpu_batches)]
        batch = prepare(batch, device) if prepare is not None else batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            losses = crit(model(batch.det), batch.det, batch.targets)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return len(batch)

    for s in range(warmup):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    images = sum(one(warmup + s) for s in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", required=True, help="a cache store (repeat for several)")
    ap.add_argument("--coco", default=None, help="COCO folder (default: the one the cache recorded)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20, help="timed loader batches")
    ap.add_argument("--steps", type=int, default=5, help="timed MaskNet steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None, help="run recipe TOML (its [masknet]/[loss]/[train].amp are used)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    args = ap.parse_args()
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.stage2 import resolve_masknet_config, with_cache_enc_layer

    cfg = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    cfg = with_cache_enc_layer(cfg, args.cache[0])  # the detector's default layer unless the recipe sets one
    enc_layer = resolve_masknet_config(cfg).enc_layer
    device = torch.device(args.device)
    print(
        f"device {device}, batch {args.batch_size}, {args.batches} loader batches / {args.steps} MaskNet steps "
        f"timed after {args.warmup} warm-up; torch threads {torch.get_num_threads()}"
    )
    print(f"{'cache':<40}{'C1':>10}{'workers':>9}{'loader img/s':>14}{'step img/s':>12}{'loader/step':>13}")
    for cache in args.cache:
        ds = _dataset(cache, args.coco, enc_layer)
        mode = ds.store.c1_mode
        step = consumer_rate(ds, cfg, device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
        for w in args.workers:
            load = loader_rate(
                ds,
                workers=w,
                batch_size=args.batch_size,
                batches=args.batches,
                warmup=args.warmup,
                prefetch=args.prefetch,
            )
            print(f"{str(cache)[-40:]:<40}{mode:>10}{w:>9}{load:>14.2f}{step:>12.2f}{load / step:>12.2f}x")
    print(
        "recompute caches: the loader figure includes image read + sha256 + decode + preprocessing; the "
        "stage-0 forward that rebuilds C1 runs on the training device and counts in the step figure"
    )


if __name__ == "__main__":
    main()
