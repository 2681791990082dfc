"""Cached vs online stage-2 training, per detector, side by side in one run: step throughput and peak memory.

For each detector named (random weights unless ``--checkpoint``; the same weights in every mode, saved once
to a temporary file), the script caches ``--images`` synthetic images, builds synthetic GT **from the
detector's own top boxes** (``--objects`` well-separated boxes per image become elliptic instances, so a few
objects per image are each covered by several of the top-K boxes, as with a trained detector; the positive
rate is measured and printed), then times, each in its own child process (CPU: its own peak RSS):

- ``cached-allK``: the MaskNet step as before, all K queries through the box branch (``MaskNet.forward``);
- ``cached``: the MaskNet step that runs the box branch only on the queries that get a loss;
- ``online``: the frozen detector on the images, then that same MaskNet step.

Peak memory: CUDA — ``torch.cuda.max_memory_allocated`` per mode; CPU — the peak RSS of the mode's own
process (everything it holds: MaskNet, the detector in online mode, batches, activations), and the peak of
the live tensors of one more step (torch's ``MemTracker``: weights, optimizer state, batch, activations and
temporaries; the figure a GPU would hold, without the process itself).

    python benchmarks/bench_train.py --detectors dino_r50 dino_focal hdetr_swinl --image-size 800 1066 \
        --images 2 --steps 2 --warmup 1 --batch-size 1                   # the README's CPU figures
    python benchmarks/bench_train.py --detectors dino_r50 dino_focal hdetr_swinl --device cuda --batch-size 2
    python benchmarks/bench_train.py --detectors dino_tiny --image-size 96 128 --topk 20 \
        --set masknet.num_queries=20 --images 2 --steps 1 --warmup 0       # a smoke run
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

MODES = ("cached-allK", "cached", "online")


def synthetic_images(n: int, hw: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """``n`` normalised random images of size ``hw``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, hw[0], hw[1], generator=g) for _ in range(n)]


def image_batch(imgs: list[torch.Tensor], ids: list[int]) -> ImageBatch:
    x = torch.stack(imgs)
    b, _, h, w = x.shape
    hw = torch.tensor([[h, w]] * b)
    return ImageBatch(
        images=x,
        pad_mask=torch.zeros(b, h, w, dtype=torch.bool),
        input_hw=hw,
        orig_hw=hw.clone(),
        image_ids=ids,
        file_names=[f"{i}.png" for i in ids],
        targets=None,
    )


def gt_from_boxes(
    boxes_xyxy: torch.Tensor, labels: torch.Tensor, hw: tuple[int, int], image_id: int, objects: int
) -> GTInstances:
    """Up to ``objects`` GT instances at well-separated boxes among ``boxes_xyxy`` (score order): each is an
    ellipse inscribed in its box (boxes clamped to the image, at least 8 px a side)."""
    from torchvision.ops import box_iou

    h, w = hw
    b = boxes_xyxy.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, h - 1)
    keep: list[int] = []
    for k in range(b.shape[0]):
        if (b[k, 2] - b[k, 0]) < 8 or (b[k, 3] - b[k, 1]) < 8:
            continue
        if keep and float(box_iou(b[k : k + 1], b[keep]).max()) > 0.3:
            continue
        keep.append(k)
        if len(keep) == objects:
            break
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = []
    for k in keep:
        x0, y0, x1, y1 = b[k].tolist()
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)
    n = len(keep)
    m = torch.stack(masks) if n else torch.zeros(0, h, w, dtype=torch.bool)
    return GTInstances(
        boxes=b[keep].float(),
        labels=labels[keep].long(),
        masks=m,
        iscrowd=torch.zeros(n, dtype=torch.bool),
        image_id=image_id,
        orig_hw=(h, w),
    )


def write_cache(
    detector: Any,
    imgs: list[torch.Tensor],
    path: Path,
    *,
    topk: int,
    enc_layer: int,
    batch_size: int,
    device: torch.device,
) -> None:
    from mfdetr.cache import CacheWriter, build_manifest, records_from_output
    from mfdetr.cache.store import open_for_writing

    ids = list(range(1, len(imgs) + 1))
    manifest = build_manifest(
        preset=detector.preset,
        checkpoint_file="bench.pth",
        checkpoint_sha256="0" * 64,
        split="bench",
        annotation_file="none.json",
        annotation_sha256="0" * 64,
        image_ids=ids,
        topk=topk,
        enc_layers=(enc_layer,),
    )
    root = open_for_writing(path, manifest, np.asarray(ids, dtype=np.int64))
    writer = CacheWriter(root=root, path=path, manifest=manifest)
    for s in range(0, len(imgs), batch_size):
        idx = list(range(s, min(s + batch_size, len(imgs))))
        with torch.inference_mode():
            out = detector.detect(
                image_batch([imgs[i] for i in idx], [ids[i] for i in idx]).to(device),
                topk=topk,
                enc_layers=(enc_layer,),
            )
        for rec in records_from_output(
            out, indices=idx, file_names=[f"{ids[i]}.png" for i in idx], image_ids=[ids[i] for i in idx]
        ):
            writer.write_image(rec)


def make_gts(cache_dir: str, objects: int) -> list[GTInstances]:
    """GT for every cached image from its own top boxes (the same GT in every mode)."""
    from mfdetr.cache import CacheStore
    from mfdetr.masknet.targets import pred_boxes_original

    store = CacheStore.open(cache_dir)
    cats = torch.as_tensor(store.manifest["category_map"], dtype=torch.long)
    gts = []
    for i in range(len(store)):
        det, iid = store.read(i)
        h, w = (int(v) for v in det.orig_hw[0].tolist())
        labels = cats[det.logits[0].float().argmax(-1)].clamp(min=1)
        gts.append(gt_from_boxes(pred_boxes_original(det)[0], labels, (h, w), iid, objects))
    return gts


def step_losses(
    mode: str, model: Any, crit: Any, det: Any, targets: list[GTInstances], step: int
) -> dict[str, torch.Tensor]:
    """One batch's losses: all K queries through MaskNet (``cached-allK``) or only those that get a loss."""
    if mode == "cached-allK":
        return crit(model(det), det, targets)
    from mfdetr.masknet.positives import PositivesOnly

    return crit(PositivesOnly(model, crit)(det, targets, step=step), det, targets)


def own_peak_rss_mib() -> float:
    """This process's own peak resident set size (MiB). Linux keeps ``ru_maxrss`` across ``execve``, so a
    spawned mode process would report its parent's peak (the detector build and the cache writing);
    ``VmHWM`` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_peak_mib(run: Any, held: list[Any]) -> float:
    """Peak bytes of live tensors (MiB) during ``run()``, counting the modules and optimizers ``held``."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed._tools.mod_tracker import ModTracker

    class NoModuleHooks(ModTracker):  # only the totals are read: no per-module hooks, which fail under
        def __enter__(self) -> NoModuleHooks:  # inference mode (the frozen detector of the online step)
            return self

        def __exit__(self, *args: object) -> None:
            pass

    tracker = MemTracker()
    tracker._mod_tracker = NoModuleHooks()
    tracker.track_external(*held)
    with tracker:
        run()
    return max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()) / 2**20


def run_mode(mode: str, args: argparse.Namespace, work: str, detector: str, queue: Any = None) -> dict[str, float]:
    from mfdetr.cache import CacheStore
    from mfdetr.detectors import build_detector
    from mfdetr.engine.collate import collate_detector_outputs
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.online import DetectorStep
    from mfdetr.engine.stage2 import build_parts, resolve_masknet_config

    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    cfg = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    mcfg = resolve_masknet_config(cfg)
    store = CacheStore.open(Path(work) / "cache")
    gts = [
        GTInstances(**{**g, "orig_hw": tuple(g["orig_hw"])})
        for g in torch.load(Path(work) / "gts.pt", weights_only=True)
    ]
    imgs = synthetic_images(args.images, tuple(args.image_size))
    step = None
    if mode == "online":
        det_model = build_detector(detector, checkpoint=str(Path(work) / "detector.pt"), device=str(device))
        step = DetectorStep(detector=det_model, topk=args.topk, enc_layers=(mcfg.enc_layer,))
    parts = build_parts(cfg, store.manifest)
    model, crit = parts.model.to(device).train(), parts.criterion.to(device)
    from mfdetr.engine.optim import make_adamw

    opt = make_adamw([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=5e-5)
    amp = device.type == "cuda"
    npos: list[float] = []

    def one(s: int) -> None:
        idx = [(s * args.batch_size + j) % len(imgs) for j in range(args.batch_size)]
        if step is not None:
            batch = image_batch([imgs[i] for i in idx], [i + 1 for i in idx])
            batch.targets = [gts[i] for i in idx]
            b = step(batch, device)
        else:
            reads = [store.read(i, enc_layers=[mcfg.enc_layer])[0] for i in idx]
            b = collate_detector_outputs([(d, gts[i]) for d, i in zip(reads, idx, strict=True)]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = step_losses(mode, model, crit, b.det, b.targets, s)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        npos.append(float(losses["num_pos"]) / len(idx))

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
    res = {
        "img_per_s": args.steps * args.batch_size / dt,
        "s_per_step": dt / args.steps,
        "pos_per_img": sum(npos) / max(len(npos), 1),
    }
    if device.type == "cuda":
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_mem_mib"] = own_peak_rss_mib()
        held = [model, opt] if step is None else [model, opt, step.detector]
        res["peak_tensor_mib"] = tensor_peak_mib(lambda: one(args.warmup + args.steps), held)
    if queue is not None:
        queue.put(res)
    return res


def bench_detector(name: str, args: argparse.Namespace, enc_layer: int) -> dict[str, dict[str, float]]:
    """Cache, GT and the three modes of one detector (each mode in its own process on CPU)."""
    from mfdetr.detectors import build_detector

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(args.seed)
        det = build_detector(name, checkpoint=args.checkpoint, device=str(device))
        torch.save(det.state_dict(), Path(work) / "detector.pt")  # type: ignore[attr-defined]
        t = time.perf_counter()
        write_cache(
            det,
            synthetic_images(args.images, tuple(args.image_size)),
            Path(work) / "cache",
            topk=args.topk,
            enc_layer=enc_layer,
            batch_size=args.batch_size,
            device=device,
        )
        print(f"[{name}] cache of {args.images} images written in {time.perf_counter() - t:.1f} s", flush=True)
        del det
        torch.save([dict(vars(g)) for g in make_gts(str(Path(work) / "cache"), args.objects)], Path(work) / "gts.pt")
        results: dict[str, dict[str, float]] = {}
        ctx = mp.get_context("spawn")
        for m in MODES:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                results[m] = run_mode(m, args, work, name)
                continue
            q = ctx.Queue()
            p = ctx.Process(target=run_mode, args=(m, args, work, name, q))
            p.start()
            results[m] = child_result(p, q, m)
            p.join()
            print(f"[{name}] {m}: {json.dumps({k: round(v, 3) for k, v in results[m].items()})}", flush=True)
    return results


def child_result(proc: Any, queue: Any, mode: str) -> dict[str, float]:
    """The result ``proc`` puts on ``queue``; an error naming the mode if the process dies first."""
    import queue as stdlib_queue

    while True:
        try:
            return queue.get(timeout=5)
        except stdlib_queue.Empty:
            if not proc.is_alive():
                raise SystemExit(f"bench_train: the {mode} process exited with status {proc.exitcode}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", nargs="+", default=["dino_tiny"])
    ap.add_argument("--checkpoint", default=None, help="detector weights (default: random; one detector only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-size", type=int, nargs=2, default=(800, 1066))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--objects", type=int, default=4, help="GT objects per image (from the detector's top boxes)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per mode process (0: default)")
    ap.add_argument("--config", default=None, help="run recipe TOML (its [masknet]/[loss]/[assign] are used)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    args = ap.parse_args()
    if args.checkpoint and len(args.detectors) > 1:
        ap.error("--checkpoint names the weights of one detector")
    from mfdetr.engine.config import build_run_config, load_run_config
    from mfdetr.engine.stage2 import resolve_masknet_config

    cfg = load_run_config(args.config, args.set) if args.config else build_run_config({}, args.set)
    enc_layer = resolve_masknet_config(cfg).enc_layer
    table = {name: bench_detector(name, args, enc_layer) for name in args.detectors}
    print(
        f"\ndevice {args.device}, images {args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, K={args.topk}, {args.objects} GT objects/image, "
        f"{'random weights' if args.checkpoint is None else args.checkpoint}"
    )
    print(f"{'detector':<14}{'mode':<13}{'pos/img':>8}{'s/step':>10}{'img/s':>9}{'peak MiB':>10}{'tensors MiB':>12}")
    for name, res in table.items():
        for m, r in res.items():
            print(
                f"{name:<14}{m:<13}{r['pos_per_img']:>8.1f}{r['s_per_step']:>10.3f}{r['img_per_s']:>9.3f}"
                f"{r['peak_mem_mib']:>10.1f}{r.get('peak_tensor_mib', float('nan')):>12.1f}"
            )
    for name, res in table.items():
        c, o, a = res["cached"], res["online"], res["cached-allK"]
        tensors = ""
        if "peak_tensor_mib" in c:
            tensors = f" (live tensors {c['peak_tensor_mib'] / max(o['peak_tensor_mib'], 1e-9):.2f}x)"
        print(
            f"{name}: cached/online throughput {c['img_per_s'] / o['img_per_s']:.2f}x, peak memory "
            f"cached/online {c['peak_mem_mib'] / max(o['peak_mem_mib'], 1e-9):.2f}x{tensors}; MaskNet step "
            f"all-K/positives-only {a['s_per_step'] / c['s_per_step']:.2f}x"
        )


if __name__ == "__main__":
    main()
