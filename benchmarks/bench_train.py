"""Cached vs online stage-2 training: step throughput and peak memory, side by side in one run.

Same MaskNet (the paper's final config unless ``--config``), same batch, same detector (random weights
unless ``--checkpoint``). Cached: each step reads its images from a Zarr cache written beforehand by
that detector (float16 features, the default codec), collates, moves to the device and trains MaskNet.
Online: each step runs the frozen detector on the images, then trains MaskNet (issue 7, item 8:
goal cached ≥ 5× faster and ≤ 0.3× peak memory with a ResNet-50-size detector).

Peak memory: CUDA — ``torch.cuda.max_memory_allocated`` per mode; CPU — each mode runs in its own child
process and reports its peak RSS (``ru_maxrss``) minus its RSS before the first step.

    python benchmarks/bench_train.py --detector dino_r50 --device cuda --image-size 800 1066 --batch-size 2
    python benchmarks/bench_train.py --detector dino_tiny --device cpu --image-size 96 128 --topk 20 \
        --set masknet.num_queries=20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfdetr.contracts import GTInstances, ImageBatch  # noqa: E402


def synthetic_images(n: int, hw: tuple[int, int], seed: int = 0) -> list[tuple[torch.Tensor, GTInstances]]:
    """``n`` normalised random images of size ``hw`` with three box-shaped GT instances each."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    out = []
    for i in range(n):
        img = torch.randn(3, h, w, generator=g)
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        boxes = []
        for j in range(3):
            y0, x0 = int(h * (0.1 + 0.25 * j)), int(w * (0.1 + 0.2 * j))
            y1, x1 = y0 + h // 4, x0 + w // 3
            masks[j, y0:y1, x0:x1] = True
            boxes.append([x0, y0, x1, y1])
        gt = GTInstances(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([1, 2, 3]),
                         masks=masks, iscrowd=torch.zeros(3, dtype=torch.bool), image_id=i + 1, orig_hw=(h, w))
        out.append((img, gt))
    return out


def image_batch(items: list[tuple[torch.Tensor, GTInstances]]) -> ImageBatch:
    imgs = torch.stack([x for x, _ in items])
    b, _, h, w = imgs.shape
    hw = torch.tensor([[h, w]] * b)
    return ImageBatch(images=imgs, pad_mask=torch.zeros(b, h, w, dtype=torch.bool), input_hw=hw, orig_hw=hw.clone(),
                      image_ids=[t.image_id for _, t in items], file_names=[f"{t.image_id}.png" for _, t in items],
                      targets=[t for _, t in items])


def write_cache(detector: Any, items: list[tuple[torch.Tensor, GTInstances]], path: Path, *, topk: int,
                enc_layer: int, batch_size: int, device: torch.device) -> None:
    from mfdetr.cache import CacheWriter, build_manifest, records_from_output
    from mfdetr.cache.store import open_for_writing

    ids = [t.image_id for _, t in items]
    preset = detector.preset
    manifest = build_manifest(preset=preset, checkpoint_file="bench.pth", checkpoint_sha256="0" * 64, split="bench",
                              annotation_file="none.json", annotation_sha256="0" * 64, image_ids=ids, topk=topk,
                              enc_layers=(enc_layer,))
    root = open_for_writing(path, manifest, np.asarray(ids, dtype=np.int64))
    writer = CacheWriter(root=root, path=path, manifest=manifest)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        with torch.inference_mode():
            out = detector.detect(image_batch(chunk).to(device), topk=topk, enc_layers=(enc_layer,))
        for rec in records_from_output(out, indices=list(range(s, s + len(chunk))),
                                       file_names=[f"{t.image_id}.png" for _, t in chunk],
                                       image_ids=[t.image_id for _, t in chunk]):
            writer.write_image(rec)


def run_mode(mode: str, args: argparse.Namespace, cache_dir: str, queue: Any = None) -> dict[str, float]:
    from mfdetr.cache import CacheStore
    from mfdetr.detectors import build_detector
    from mfdetr.engine.collate import collate_detector_outputs
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.online import DetectorStep
    from mfdetr.engine.stage2 import build_parts, resolve_masknet_config

    device = torch.device(args.device)
    cfg = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    mcfg = resolve_masknet_config(cfg)
    items = synthetic_images(args.images, tuple(args.image_size))
    detector = build_detector(args.detector, checkpoint=args.checkpoint, device=str(device)) if mode == "online" else None
    store = CacheStore.open(cache_dir) if mode == "cached" else None
    manifest = store.manifest if store is not None else json.loads((Path(cache_dir) / "manifest_copy.json").read_text())
    parts = build_parts(cfg, manifest)
    model, crit = parts.model.to(device).train(), parts.criterion.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=5e-5)
    step = DetectorStep(detector=detector, topk=args.topk, enc_layers=(mcfg.enc_layer,)) if detector else None
    amp = device.type == "cuda"

    def one(s: int) -> None:
        idx = [(s * args.batch_size + j) % len(items) for j in range(args.batch_size)]
        if step is not None:
            batch = step(image_batch([items[i] for i in idx]), device)
        else:
            assert store is not None
            reads = [store.read(i, enc_layers=[mcfg.enc_layer])[0] for i in idx]
            batch = collate_detector_outputs([(d, items[i][1]) for d, i in zip(reads, idx, strict=True)]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = crit(model(batch.det), batch.det, batch.targets)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for s in range(args.warmup):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for s in range(args.steps):
        one(args.warmup + s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res = {"img_per_s": args.steps * args.batch_size / dt, "s_per_step": dt / args.steps}
    if device.type == "cuda":
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_mem_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if queue is not None:
        queue.put(res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="dino_tiny")
    ap.add_argument("--checkpoint", default=None, help="detector weights (default: random)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, nargs=2, default=(800, 1066))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--config", default=None, help="run recipe TOML (its [masknet]/[loss] are used)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    args = ap.parse_args()
    from mfdetr.config import to_dict
    from mfdetr.detectors import build_detector
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.stage2 import resolve_masknet_config

    cfg = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    enc_layer = resolve_masknet_config(cfg).enc_layer
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        det = build_detector(args.detector, checkpoint=args.checkpoint, device=str(device))
        t = time.perf_counter()
        write_cache(det, synthetic_images(args.images, tuple(args.image_size)), cache, topk=args.topk,
                    enc_layer=enc_layer, batch_size=args.batch_size, device=device)
        t_cache = time.perf_counter() - t
        from mfdetr.cache import CacheStore

        (cache / "manifest_copy.json").write_text(json.dumps(CacheStore.open(cache).manifest))
        del det
        if device.type == "cuda":
            torch.cuda.empty_cache()
            results = {m: run_mode(m, args, str(cache)) for m in ("cached", "online")}
        else:  # one child process per mode, so each peak RSS is its own
            ctx = mp.get_context("spawn")
            results = {}
            for m in ("cached", "online"):
                q = ctx.Queue()
                p = ctx.Process(target=run_mode, args=(m, args, str(cache), q))
                p.start()
                results[m] = q.get()
                p.join()
    c, o = results["cached"], results["online"]
    print(f"detector {args.detector} ({'random weights' if args.checkpoint is None else args.checkpoint}), "
          f"device {device}, images {args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size}, "
          f"{args.steps} timed steps, K={args.topk}; cache written in {t_cache:.1f} s")
    print("MaskNet:", json.dumps(to_dict(resolve_masknet_config(cfg))))
    print(f"{'mode':<8}{'img/s':>10}{'s/step':>10}{'peak MiB':>12}")
    for m, r in results.items():
        print(f"{m:<8}{r['img_per_s']:>10.2f}{r['s_per_step']:>10.3f}{r['peak_mem_mib']:>12.1f}")
    print(f"cached/online throughput: {c['img_per_s'] / o['img_per_s']:.2f}x (goal >= 5x); "
          f"peak memory cached/online: {c['peak_mem_mib'] / max(o['peak_mem_mib'], 1e-9):.2f}x (goal <= 0.3x)")


if __name__ == "__main__":
    main()
