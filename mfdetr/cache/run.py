"""Stage 1 driver: run a frozen detector over a COCO split into a cache store (``mfdetr cache``).

:func:`run_cache` plans the job (preset, dataset, manifest, this shard's pending images), creates
or reopens the store (race-free, manifest compared), then streams batches: DataLoader → detector →
non-finite check → :class:`~mfdetr.cache.writer.BackgroundWriter`. Rerunning the same command resumes:
only images whose commit flag is unset are computed. Shards (``--shard i/n`` or torchrun's
``RANK``/``WORLD_SIZE``) take the store indices ``i, i+n, i+2n, …``, so they never share an image.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mfdetr.cache.manifest import build_manifest, sha256_file
from mfdetr.cache.store import human_bytes as _human
from mfdetr.devices import resolve_device
from mfdetr.cache.store import open_for_writing, read_commit_flags, stored_bytes
from mfdetr.cache.writer import (COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED, BackgroundWriter, CacheWriter,
                                 WriteStats)
from mfdetr.contracts import DetectorOutput, FrozenDetector
from mfdetr.data import CocoInstances, iterate_batches, resized_hw, run_or_skip, same_size_batches
from mfdetr.errors import MfdetrError

#: Assumed compression (raw float16 valid bytes / stored bytes) for ``--dry-run`` estimates: ResNet C1
#: ~1.55x (ReLU zeros; 2.0x on benchmarks/bench_cache.py's synthetic maps), LayerNorm-ed encoder maps and
#: queries ~1.07x (1.07-1.09x measured, zstd-1). A real run prints the measured ratios in its summary.
ASSUMED_RATIO = {"c1": 1.55, "enc": 1.07, "queries": 1.07, "other": 1.0}


@dataclass(frozen=True)
class CacheJob:
    """Everything ``mfdetr cache`` was asked to do (see the CLI for the meaning of each option)."""

    detector: str
    checkpoint: Path
    coco: Path
    split: str
    out: Path
    topk: int = 100
    enc_layers: tuple[int, ...] = (4,)
    batch_size: int = 1
    shard: tuple[int, int] | None = None
    device: str = "cpu"
    num_workers: int = 2
    writer_threads: int = 4
    retry_skipped: bool = False
    annotation_file: Path | None = None


@dataclass
class CacheSummary:
    """What a run did (this process) and the state of the whole store afterwards."""

    store: Path
    shard: tuple[int, int]
    planned: int = 0
    stats: WriteStats = field(default_factory=WriteStats)
    store_done: int = 0
    store_skipped: int = 0
    store_pending: int = 0
    store_bytes: int = 0
    wall_s: float = 0.0
    loop_s: float = 0.0      # first batch requested → last image written (steady-state throughput)
    detect_s: float = 0.0    # main thread in detector.detect (on CUDA: kernel launches, may be asynchronous)
    estimate: dict[str, Any] | None = None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    if text is None or text == "":
        return None
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise MfdetrError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise MfdetrError(f"--shard {text}: need 0 <= i < n")
    return i, n


def resolve_shard(shard: tuple[int, int] | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Explicit ``--shard`` wins; else torchrun's ``RANK``/``WORLD_SIZE``; else ``(0, 1)``."""
    env = dict(os.environ) if env is None else env
    if shard is not None:
        return shard
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}") or (0, 1)
    return 0, 1


@dataclass
class _Plan:
    preset: Any
    dataset: CocoInstances
    manifest: dict[str, Any]
    image_ids: np.ndarray
    shard: tuple[int, int]


def plan_job(job: CacheJob) -> _Plan:
    """Resolve preset, dataset and manifest (no detector built, no store touched)."""
    from mfdetr.detectors.registry import get_preset, load_plugins

    load_plugins()
    preset = get_preset(job.detector)
    if not Path(job.checkpoint).is_file():
        raise MfdetrError("checkpoint file not found", path=job.checkpoint)
    if job.batch_size < 1:
        raise MfdetrError(f"--batch-size must be >= 1, got {job.batch_size}")
    dataset = CocoInstances(job.coco, job.split, preprocessing=preset.preprocessing, with_targets=False,
                            annotation_file=job.annotation_file)
    image_ids = np.asarray(dataset.image_ids, dtype=np.int64)
    manifest = build_manifest(
        preset=preset, checkpoint_file=str(job.checkpoint), checkpoint_sha256=sha256_file(job.checkpoint),
        split=job.split, annotation_file=str(dataset.annotation_file),
        annotation_sha256=dataset.annotation_sha256, image_ids=image_ids.tolist(), topk=job.topk,
        enc_layers=job.enc_layers)
    return _Plan(preset=preset, dataset=dataset, manifest=manifest, image_ids=image_ids,
                 shard=resolve_shard(job.shard))


def estimate_bytes(plan: _Plan, indices: list[int]) -> dict[str, Any]:
    """Estimated bytes/image from the annotation's image sizes, the shapes and :data:`ASSUMED_RATIO`."""
    m = plan.manifest
    pre = plan.preset.preprocessing
    d, k, c, c1 = m["hidden_dim"], m["topk"], m["num_classes"], m["c1_channels"]
    n_layers = len(m["enc_layers"])
    canvas = 2 * (d * n_layers * sum(h * w for h, w in m["canvas"]["level_hw"])
                  + c1 * m["canvas"]["c1_hw"][0] * m["canvas"]["c1_hw"][1]) + k * (2 * d + 4 * 4 + 4 * c)
    raw_valid = est = 0.0
    for i in indices:
        info = plan.dataset.image_info(int(plan.image_ids[i]))
        ih, iw = resized_hw(int(info["height"]), int(info["width"]), pre.short_side, pre.max_size)
        enc = 2 * d * n_layers * sum(math.ceil(ih / s) * math.ceil(iw / s) for s in m["level_strides"])
        c1b = 2 * c1 * math.ceil(ih / 4) * math.ceil(iw / 4)
        other = k * (4 * 4 + 4 * c) + 64
        raw_valid += enc + c1b + 2 * k * d + other
        est += (enc / ASSUMED_RATIO["enc"] + c1b / ASSUMED_RATIO["c1"] + 2 * k * d / ASSUMED_RATIO["queries"]
                + other / ASSUMED_RATIO["other"])
    n = max(len(indices), 1)
    return {"images": len(indices), "bytes_per_image": est / n, "raw_f16_valid_per_image": raw_valid / n,
            "raw_canvas_per_image": float(canvas), "total_bytes": est}


def _todo(plan: _Plan, commit: np.ndarray, retry_skipped: bool) -> list[int]:
    i, n = plan.shard
    mine = np.arange(i, len(plan.image_ids), n)
    pending = commit[mine] == COMMIT_PENDING
    if retry_skipped:
        pending |= commit[mine] == COMMIT_SKIPPED
    return mine[pending].tolist()


def _check_output(out: DetectorOutput, m: dict[str, Any], ids: list[int]) -> None:
    k, d, c = m["topk"], m["hidden_dim"], m["num_classes"]
    got = (out.queries.shape[1], out.queries.shape[2], out.logits.shape[2], out.c1.shape[1])
    if got != (k, d, c, m["c1_channels"]) or set(out.enc_maps) != set(m["enc_layers"]):
        raise MfdetrError(f"detector output (K, d, C, C1)={got}, layers {sorted(out.enc_maps)} does not match "
                          f"the store ({k}, {d}, {c}, {m['c1_channels']}), layers {m['enc_layers']} "
                          f"(images {ids})")


def write_source_hint(store: Path, *, coco: Path, annotation_file: Path) -> None:
    """Record the absolute COCO folder and annotation file the store was written from, so that
    ``mfdetr train/eval --cache`` on the same machine need no ``--coco`` (atomic; shards write the same)."""
    import json

    from mfdetr.cache.manifest import SOURCE_HINT

    hint = {"coco_root": str(Path(coco).resolve()), "annotation_path": str(Path(annotation_file).resolve())}
    tmp = store / f".{SOURCE_HINT}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(hint, indent=2) + "\n")
    os.replace(tmp, store / SOURCE_HINT)


def run_cache(job: CacheJob, *, dry_run: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print, detector: FrozenDetector | None = None) -> CacheSummary:
    """Run (or with ``dry_run`` only estimate) a cache job; see the module doc.

    Args:
        detector: an already built detector (tests, benchmarks); default: built from the registry.
    """
    t_start = time.perf_counter()
    plan = plan_job(job)
    m = plan.manifest
    out_path = Path(job.out)
    summary = CacheSummary(store=out_path, shard=plan.shard)
    n = len(plan.image_ids)
    shard_txt = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard[1] > 1 else ""
    if dry_run:
        commit = np.zeros(n, dtype=np.uint8)
        if out_path.exists():
            from mfdetr.cache.reader import CacheStore

            commit = CacheStore.open(out_path, expect={k: m[k] for k in m if k != "created_utc"}).commit_flags()
        todo = _todo(plan, commit, job.retry_skipped)
        est = estimate_bytes(plan, todo)
        summary.estimate, summary.planned = est, len(todo)
        echo(f"images: {n} in {job.split}; {int((commit == COMMIT_DONE).sum())} already done; "
             f"{len(todo)} to compute{shard_txt}")
        echo(f"estimated bytes/image: {_human(est['bytes_per_image'])} (raw float16, valid region: "
             f"{_human(est['raw_f16_valid_per_image'])}; raw canvas: {_human(est['raw_canvas_per_image'])}; "
             f"assumed compression ratios {ASSUMED_RATIO}; the run's summary prints the measured ones)")
        echo(f"estimated total: {_human(est['total_bytes'])} for {len(todo)} images")
        return summary

    root = open_for_writing(out_path, m, plan.image_ids)
    write_source_hint(out_path, coco=job.coco, annotation_file=plan.dataset.annotation_file)
    commit = read_commit_flags(out_path, root["commit"])  # type: ignore[arg-type]
    todo = _todo(plan, commit, job.retry_skipped)
    summary.planned = len(todo)
    layers = list(m["enc_layers"])
    writer = CacheWriter(root=root, path=out_path, manifest=m)
    summary.stats = writer.stats
    if todo:
        if detector is None:
            from mfdetr.detectors.registry import build_detector

            detector = build_detector(job.detector, checkpoint=job.checkpoint, device=str(resolve_device(job.device)))
        device = next(iter(detector.parameters()), None) if isinstance(detector, torch.nn.Module) else None
        dev = device.device if device is not None else resolve_device(job.device)
        # queue: batches waiting for a worker (each holds its detector output, on the device)
        bg = BackgroundWriter(writer=writer, threads=job.writer_threads, queue_size=max(2, job.writer_threads))
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc=f"cache{shard_txt}", dynamic_ncols=True)
        failed = True
        t_loop = time.perf_counter()
        try:
            # batches of one input size: detections identical to batch 1 (detectors are not padding-invariant)
            for batch, skips in iterate_batches(plan.dataset, num_workers=job.num_workers,
                                                batches=same_size_batches(plan.dataset, todo, job.batch_size)):
                for s in skips:
                    bg.write_skip(s.index, int(plan.image_ids[s.index]), s.reason)
                if batch is not None:
                    t0 = time.perf_counter()
                    with torch.inference_mode():  # an image the detector cannot process is skipped, recorded
                        done, failed = run_or_skip(
                            lambda b: detector.detect(b.to(dev), topk=job.topk, enc_layers=layers), batch)
                    for pos, reason in failed:
                        iid = batch.image_ids[pos]
                        bg.write_skip(plan.dataset.index_of(iid), iid, f"{batch.file_names[pos]}: {reason}")
                    summary.detect_s += time.perf_counter() - t0
                    for part, out in done:
                        _check_output(out, m, part.image_ids)
                        bg.write_output(out, indices=[plan.dataset.index_of(i) for i in part.image_ids],
                                        file_names=part.file_names, image_ids=part.image_ids)
                bar.update(bg.completed - bar.n)
                bar.set_postfix_str(f"written {_human(writer.stats.bytes_written)}", refresh=False)
            failed = False
        finally:
            bg.close(raise_errors=not failed)
            summary.loop_s = time.perf_counter() - t_loop
            bar.update(bg.completed - bar.n)
            bar.close()
    final = read_commit_flags(out_path, root["commit"])  # type: ignore[arg-type]
    summary.store_done = int((final == COMMIT_DONE).sum())
    summary.store_skipped = int((final == COMMIT_SKIPPED).sum())
    summary.store_pending = int((final == COMMIT_PENDING).sum())
    summary.store_bytes = stored_bytes(out_path)
    summary.wall_s = time.perf_counter() - t_start
    for line in format_summary(summary):
        echo(line)
    return summary


def format_summary(s: CacheSummary) -> list[str]:
    """The end-of-run report: images done/skipped (with reasons), bytes, per-array compression."""
    st = s.stats
    lines = [f"done: {st.done} images this run, {len(st.skipped)} skipped, in {s.wall_s:.1f} s; store {s.store}: "
             f"{s.store_done} done, {s.store_skipped} skipped, {s.store_pending} pending"]
    for index, image_id, reason in st.skipped:
        lines.append(f"  skipped index {index} (image id {image_id}): {reason}")
    lines.append(f"bytes on disk (whole store): {_human(s.store_bytes)}")
    if st.done:
        stored = sum(st.stored.values())
        valid = sum(v for k, v in st.raw_valid.items() if k not in ("commit", "skip_reason"))
        lines.append(f"bytes/image: {_human(stored / st.done)} stored; raw (valid region) {_human(valid / st.done)}; "
                     f"stored/raw = {stored / max(valid, 1):.3f}")
        lines.append("per array: stored, raw canvas, raw valid, canvas ratio, valid ratio")
        for name in sorted(st.stored):
            if name in ("commit", "skip_reason"):
                continue
            sb, cb, vb = st.stored[name], st.raw_canvas[name], st.raw_valid[name]
            lines.append(f"  {name:22s} {_human(sb):>10s} {_human(cb):>10s} {_human(vb):>10s} "
                         f"{cb / max(sb, 1):6.2f}x {vb / max(sb, 1):6.2f}x")
    return lines


__all__ = ["ASSUMED_RATIO", "CacheJob", "CacheSummary", "estimate_bytes", "format_summary",
           "parse_shard", "plan_job", "resolve_shard", "run_cache"]
