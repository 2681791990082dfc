"""Benchmark of stage 1 (``mfdetr cache``): throughput against the detector alone, and bytes per image.

Prints (not pass/fail):

1. detector-forward-only throughput (img/s) and full cache throughput (img/s: forward + host copy +
   padding + compression + writing, overlapped by the background writer) **in the same run**, and
   their ratio (goal >= 0.9);
2. bytes/image stored with the default codec vs the raw bytes of the valid region (float16 features,
   float32 boxes/logits) — goal <= 0.7x *including* the canvas padding — per array too;
3. other codecs on the first image's arrays (ratio and encode speed), to justify the default;
4. bytes/image under every feature codec preset (``mfdetr cache --codec``), with C1 stored and without
   it (``--c1 recompute``), and each preset's ratio to the lossless store — the written images' feature
   arrays re-encoded in memory with each preset's numcodecs chain (valid region, whole array), plus the
   other arrays' stored bytes.

By default it runs a *synthetic detector with R50 DINO output shapes* (d=256, C1=256, strides 8-64,
K=100, C=91; LayerNorm-ed spatially smooth encoder maps, ReLU'd C1 with ~half zeros) on ``mfdetr
synth`` images of R50 size (800 x 800..1066 after the eval resize). ``--emulate-ms`` adds a GIL-free
sleep per image to emulate GPU compute. With a real detector::

    python benchmarks/bench_cache.py --detector dino_r50 --checkpoint ckpt.pth --coco DIR --device cuda

Synthetic feature values only approximate real compressibility: rerun with a real detector.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfdetr.cache import CacheJob, CacheStore, run_cache  # noqa: E402
from mfdetr.cache.run import CacheSummary  # noqa: E402
from mfdetr.cache.schema import enc_array_name  # noqa: E402
from mfdetr.contracts import DetectorOutput, DetectorPreset, ImageBatch, Preprocessing, coco91_identity  # noqa: E402
from mfdetr.detectors.registry import build_detector, list_detectors, load_plugins, register_detector  # noqa: E402

SYNTH_NAME = "bench_r50_shapes"
SYNTH_PRESET = DetectorPreset(
    name=SYNTH_NAME,
    family="synthetic",
    arch={},
    checkpoint_file=None,
    checkpoint_sha256=None,
    box_ap=None,
    num_classes=91,
    class_to_category=coco91_identity(),
    preprocessing=Preprocessing(short_side=800, max_size=1333),
    level_strides=(8, 16, 32, 64),
    hidden_dim=256,
    c1_channels=256,
    num_encoder_layers=6,
    notes="benchmark only: R50 DINO output shapes with synthetic values",
)


class SyntheticR50(torch.nn.Module):
    """Outputs with DINO-R50 shapes and roughly realistic statistics; ``emulate_ms`` sleeps per image."""

    def __init__(self, *, emulate_ms: float = 0.0, memoize: bool = False) -> None:
        super().__init__()
        self.preset = SYNTH_PRESET
        self.emulate_ms = emulate_ms
        self.memoize = memoize
        self._memo: dict[tuple[int, ...], DetectorOutput] = {}

    @staticmethod
    def _smooth(g: torch.Generator, c: int, h: int, w: int, noise: float) -> torch.Tensor:
        low = torch.randn(1, c, max(h // 8, 1), max(w // 8, 1), generator=g)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        return x + noise * torch.randn(c, h, w, generator=g)

    def detect(self, batch: ImageBatch, *, topk: int = 100, enc_layers: Sequence[int] = (4,)) -> DetectorOutput:
        key = tuple(batch.image_ids)
        if self.memoize and key in self._memo:  # "GPU-like": the host CPU only waits
            time.sleep(self.emulate_ms * len(batch) / 1000)
            return self._memo[key]
        out = self._generate(batch, topk=topk, enc_layers=enc_layers)
        if self.memoize:
            self._memo[key] = out
        return out

    def _generate(self, batch: ImageBatch, *, topk: int, enc_layers: Sequence[int]) -> DetectorOutput:
        d, bsz = 256, len(batch)
        hp, wp = batch.images.shape[-2:]
        strides = SYNTH_PRESET.level_strides
        enc = {e: [torch.zeros(bsz, d, -(-hp // s), -(-wp // s)) for s in strides] for e in enc_layers}
        c1 = torch.zeros(bsz, 256, -(-hp // 4), -(-wp // 4))
        valid = []
        for b, (h, w) in enumerate(batch.input_hw.tolist()):
            g = torch.Generator().manual_seed(int(batch.image_ids[b]))
            for e in enc_layers:
                for lvl, s in enumerate(strides):
                    lh, lw = math.ceil(h / s), math.ceil(w / s)
                    x = self._smooth(g, d, lh, lw, 0.5)
                    enc[e][lvl][b, :, :lh, :lw] = F.layer_norm(x.permute(1, 2, 0), (d,)).permute(2, 0, 1)
            ch, cw = math.ceil(h / 4), math.ceil(w / 4)
            c1[b, :, :ch, :cw] = F.relu(self._smooth(g, 256, ch, cw, 0.3) * 0.8 - 0.05)
            valid.append([[math.ceil(h / s), math.ceil(w / s)] for s in strides])
        if self.emulate_ms:
            time.sleep(self.emulate_ms * bsz / 1000)
        g = torch.Generator().manual_seed(int(batch.image_ids[0]))
        return DetectorOutput(
            queries=F.layer_norm(torch.randn(bsz, topk, d, generator=g), (d,)),
            boxes=torch.rand(bsz, topk, 4, generator=g),
            logits=torch.randn(bsz, topk, 91, generator=g) - 4,
            enc_maps=enc,
            c1=c1,
            input_hw=batch.input_hw,
            orig_hw=batch.orig_hw,
            level_valid_hw=torch.tensor(valid, dtype=torch.int64),
        )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_only(detector, job: CacheJob) -> float:
    """img/s of data loading + detector forward alone (the upper bound of caching)."""
    from mfdetr.data import CocoInstances, iterate_batches

    ds = CocoInstances(job.coco, job.split, preprocessing=detector.preset.preprocessing, with_targets=False)
    n = 0
    dev = torch.device(job.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch, _skips in iterate_batches(ds, batch_size=job.batch_size, num_workers=job.num_workers):
            if batch is not None:
                detector.detect(batch.to(dev), topk=job.topk, enc_layers=job.enc_layers)
                _sync(job.device)
                n += len(batch)
    return n / (time.perf_counter() - t0)


def writer_only(detector, job: CacheJob, store: Path, repeats: int = 2) -> float:
    """img/s of the background writer alone (padding + compression + writing, ``job.writer_threads``
    threads): records of the first images are computed once, then rewritten into their own chunks."""
    import zarr

    from mfdetr.cache import BackgroundWriter, CacheWriter, records_from_output
    from mfdetr.data import CocoInstances, iterate_batches

    st = CacheStore.open(store)
    ds = CocoInstances(job.coco, job.split, preprocessing=detector.preset.preprocessing, with_targets=False)
    records = []
    with torch.inference_mode():
        for batch, _skips in iterate_batches(ds, batch_size=1, indices=st.complete_indices()[:4].tolist()):
            out = detector.detect(batch.to(torch.device(job.device)), topk=job.topk, enc_layers=job.enc_layers)
            records += records_from_output(
                out,
                indices=[ds.index_of(i) for i in batch.image_ids],
                file_names=batch.file_names,
                image_ids=batch.image_ids,
            )
    root = zarr.open_group(str(store), mode="r+")
    bg = BackgroundWriter(
        writer=CacheWriter(root=root, path=store, manifest=st.manifest), threads=job.writer_threads, queue_size=4
    )
    t0 = time.perf_counter()
    for _ in range(repeats):
        bg.write_records(records)
    bg.close()
    return repeats * len(records) / (time.perf_counter() - t0)


def reader(store: Path, repeats: int = 2) -> float:
    """img/s of :meth:`CacheStore.read` (all stored arrays of one image, cropped) — what stage 2 pays."""
    st = CacheStore.open(store)
    idx = st.complete_indices().tolist()
    st.read(idx[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in idx:
            st.read(i)
    return repeats * len(idx) / (time.perf_counter() - t0)


def codec_table(store: Path) -> list[str]:
    """Other codecs on image 0's stored (canvas) arrays: size vs raw and encode speed."""
    from numcodecs import Blosc, Zstd

    st = CacheStore.open(store)
    i = int(st.complete_indices()[0])
    names = ["c1", enc_array_name(st.enc_layers[0], 0), "queries"]
    arrays = st.read_arrays(i, names)
    codecs = {
        "zstd-1 (default)": Zstd(1),
        "zstd-3": Zstd(3),
        "blosc-zstd-1-shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
        "blosc-zstd-3-bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
        "blosc-lz4-5-bitshuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
    }
    lines = [f"codecs on image {i} (canvas arrays; ratio = raw canvas / compressed, speed = encode MB/s):"]
    for cname, codec in codecs.items():
        cells = []
        for name in names:
            x = np.ascontiguousarray(arrays[name])
            t0 = time.perf_counter()
            size = len(codec.encode(x))
            dt = time.perf_counter() - t0
            cells.append(f"{name} {x.nbytes / size:5.2f}x {x.nbytes / dt / 1e6:6.0f} MB/s")
        lines.append(f"  {cname:26s} " + " | ".join(cells))
    return lines


def preset_table(store: Path) -> list[str]:
    """Bytes/image of every codec preset, C1 stored and not, over the store's finished (lossless) images."""
    from mfdetr.cache.codecs import PRESETS
    from mfdetr.cache.sizes import numcodecs_chain, encoded_size
    from mfdetr.cache.chunk_files import stored_bytes

    st = CacheStore.open(store)
    m = st.manifest
    done = st.complete_indices().tolist()
    small = ("boxes", "logits", "input_hw", "orig_hw", "level_valid_hw", "image_ids", "commit", "skip_reason")
    other = sum(
        stored_bytes(store, n) - (store / n / "zarr.json").stat().st_size  # never filtered: as stored
        for n in small
    ) / len(done)
    sizes = {p: {"c1": 0.0, "rest": 0.0} for p in PRESETS}
    for i in done:
        out, _ = st.read(i, crop=True)
        feats = [out.queries[0].numpy()] + [
            out.enc_maps[e][lvl][0].numpy() for e in st.enc_layers for lvl in range(len(st.level_strides))
        ]
        for p, preset in PRESETS.items():
            chain = numcodecs_chain(preset, m["codecs"]["data"])
            sizes[p]["c1"] += encoded_size(out.c1[0].numpy(), chain) / len(done)
            sizes[p]["rest"] += sum(encoded_size(x, chain) for x in feats) / len(done)
    base = sizes["lossless"]["c1"] + sizes["lossless"]["rest"] + other
    lines = [
        f"codec presets on {len(done)} images (features re-encoded in memory, valid region; boxes/logits/"
        f"sizes as stored, {other / 1e3:.1f} KB/img):",
        f"  {'preset':12s} {'C1 stored':>14s} {'ratio':>6s} {'C1 recomputed':>14s} {'ratio':>6s} {'C1 share':>8s}",
    ]
    for p, sz in sizes.items():
        full, no_c1 = sz["c1"] + sz["rest"] + other, sz["rest"] + other
        lines.append(
            f"  {p:12s} {full / 1e3:11.1f} KB {full / base:6.3f} {no_c1 / 1e3:11.1f} KB "
            f"{no_c1 / base:6.3f} {sz['c1'] / full:8.2f}"
        )
    return lines


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default=SYNTH_NAME)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--coco", type=Path, default=None, help="COCO folder (default: a fresh `mfdetr synth` set)")
    ap.add_argument("--split", default="val2017")
    ap.add_argument("--images", type=int, default=12, help="images of the synthetic set")
    ap.add_argument("--image-size", type=int, default=600, help="synthetic shorter side (resized to 800)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--enc-layers", default="4")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--writer-threads", type=int, default=2)
    ap.add_argument("--emulate-ms", type=float, default=0.0, help="synthetic detector: extra ms/image (GPU time)")
    ap.add_argument(
        "--gpu-like",
        action="store_true",
        help="synthetic detector: generate outputs once (warm-up), then each forward only sleeps "
        "--emulate-ms (a GPU detector leaves the host CPU free for the writer)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    return ap.parse_args()


def _data_and_checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path, Path | None]:
    """The COCO folder (a fresh synthetic set unless --coco) and the detector checkpoint (the synthetic
    detector registered, with a placeholder file, when it is the one benchmarked)."""
    coco = args.coco
    if coco is None:
        from mfdetr.data import SynthConfig, generate_synth

        coco = work / "synth"
        if not (coco / "annotations").is_dir():
            generate_synth(coco, config=SynthConfig(train=0, val=args.images, image_size=args.image_size, seed=0))
    checkpoint = args.checkpoint
    if args.detector == SYNTH_NAME:
        if SYNTH_NAME not in list_detectors():
            register_detector(
                SYNTH_PRESET, lambda **kw: SyntheticR50(emulate_ms=args.emulate_ms, memoize=args.gpu_like)
            )
        if checkpoint is None:
            checkpoint = work / "synthetic.ckpt"
            checkpoint.write_bytes(b"synthetic detector: no weights")
    return coco, checkpoint


def main() -> None:
    args = _parse_args()
    load_plugins()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    coco, checkpoint = _data_and_checkpoint(args, work)
    detector = build_detector(args.detector, checkpoint=checkpoint, device=args.device)
    out = work / "store"
    shutil.rmtree(out, ignore_errors=True)
    job = CacheJob(
        detector=args.detector,
        checkpoint=checkpoint,
        coco=coco,
        split=args.split,
        out=out,
        topk=args.topk,
        enc_layers=tuple(int(x) for x in args.enc_layers.split(",")),
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
        writer_threads=args.writer_threads,
    )

    forward_only(detector, job)  # warm-up (page cache, allocator, cuDNN autotune)
    fwd = forward_only(detector, job)
    summary = run_cache(job, progress=False, echo=lambda s: None, detector=detector)
    cache_ips = summary.stats.done / summary.loop_s
    fwd2 = forward_only(detector, job)  # again after: machine load drifts, report both
    wr = writer_only(detector, job, out)
    rd = reader(out)
    _report(args, summary, fwd=fwd, fwd2=fwd2, cache_ips=cache_ips, writer_ips=wr, reader_ips=rd)
    for line in codec_table(out):
        print(line)
    for line in preset_table(out):
        print(line)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def _report(
    args: argparse.Namespace,
    summary: CacheSummary,
    *,
    fwd: float,
    fwd2: float,
    cache_ips: float,
    writer_ips: float,
    reader_ips: float,
) -> None:
    """Print the throughputs of detector, cache run, writer and reader, and the bytes per image."""
    wr, rd = writer_ips, reader_ips
    st = summary.stats
    stored = sum(st.stored.values())
    valid = sum(v for k, v in st.raw_valid.items() if k not in ("commit", "skip_reason"))
    canvas = sum(v for k, v in st.raw_canvas.items() if k not in ("commit", "skip_reason"))
    print(
        f"detector {args.detector} on {args.device}, {st.done} images, batch {args.batch_size}, "
        f"{args.writer_threads} writer threads, emulate {args.emulate_ms} ms/img, gpu-like {args.gpu_like}, "
        f"torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"throughput: detector forward only {fwd:.2f} img/s (after: {fwd2:.2f}); cache {cache_ips:.2f} img/s; "
        f"ratio {cache_ips / ((fwd + fwd2) / 2):.2f} (goal >= 0.9)"
    )
    print(
        f"writer alone ({args.writer_threads} threads): {wr:.2f} img/s — with spare cores the cache runs at "
        f"min(detector, writer); here detector and writer share {torch.get_num_threads()} busy CPU threads"
    )
    print(f"reader: CacheStore.read {rd:.2f} img/s (one process, 4 read threads; stage 2 adds DataLoader workers)")
    print(
        f"bytes/image: stored {stored / st.done / 1e6:.2f} MB; raw valid region {valid / st.done / 1e6:.2f} MB "
        f"(float16 features); raw padded canvas {canvas / st.done / 1e6:.2f} MB; "
        f"stored/raw valid = {stored / valid:.3f} (goal <= 0.7)"
    )
    for name in sorted(st.stored):
        if name in ("commit", "skip_reason"):
            continue
        print(
            f"  {name:22s} stored {st.stored[name] / st.done / 1e3:9.1f} KB/img  raw valid "
            f"{st.raw_valid[name] / st.done / 1e3:9.1f} KB/img  stored/raw valid "
            f"{st.stored[name] / max(st.raw_valid[name], 1):.3f}"
        )


if __name__ == "__main__":
    main()
