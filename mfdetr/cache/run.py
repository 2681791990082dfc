"""Stage 1 driver: run a frozen detector over a COCO split into a cache store (``mfdetr cache``).

:func:`run_cache` plans the job (:mod:`mfdetr.cache.plan`: preset, dataset, manifest, this shard's
pending images), creates
or reopens the store (race-free, manifest compared), then streams batches: DataLoader → detector →
non-finite check → :class:`~mfdetr.cache.writer.BackgroundWriter`. Rerunning the same command resumes:
only images whose commit flag is unset are computed. Shards (``--shard i/n`` or torchrun's
``RANK``/``WORLD_SIZE``) take the store indices ``i, i+n, i+2n, …``, so they never share an image.
"""

from __future__ import annotations

import dataclasses
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mfdetr.cache.codecs import with_codec_defaults
from mfdetr.cache.manifest import sha256_file
from mfdetr.cache.sizes import format_size_table
from mfdetr.devices import resolve_device
from mfdetr.cache.location import RemotePath, is_remote, remote_error, storage_problem, store_location
from mfdetr.cache.chunk_files import human_bytes as _human, stored_bytes
from mfdetr.cache.store import open_for_writing
from mfdetr.cache.writer import COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED, BackgroundWriter, CacheWriter, WriteStats
from mfdetr.cache.views import ORIG, flip_batch, read_all_commits, store_views
from mfdetr.contracts import DetectorOutput, FrozenDetector
from mfdetr.data import iterate_batches, run_or_skip, same_size_batches
from mfdetr.cache.plan import (
    CacheJob,
    _Plan,
    _todo,
    estimate_bytes,
    parse_shard,
    plan_job,
    recompute_manifest,
    reset_damaged,
    resolve_shard,
)
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write_text

__all__ = [
    "CacheJob",
    "CacheSummary",
    "estimate_bytes",
    "format_summary",
    "parse_shard",
    "plan_job",
    "reset_damaged",
    "resolve_shard",
    "run_cache",
    "write_source_hint",
]


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
    loop_s: float = 0.0  # first batch requested → last image written (steady-state throughput)
    detect_s: float = 0.0  # main thread in detector.detect (on CUDA: kernel launches, may be asynchronous)
    estimate: dict[str, Any] | None = None


def _check_output(out: DetectorOutput, m: dict[str, Any], ids: list[int]) -> None:
    k, d, c = m["topk"], m["hidden_dim"], m["num_classes"]
    got = (out.queries.shape[1], out.queries.shape[2], out.logits.shape[2], out.c1.shape[1])
    if got != (k, d, c, m["c1_channels"]) or set(out.enc_maps) != set(m["enc_layers"]):
        raise MfdetrError(
            f"detector output (K, d, C, C1)={got}, layers {sorted(out.enc_maps)} does not match "
            f"the store ({k}, {d}, {c}, {m['c1_channels']}), layers {m['enc_layers']} "
            f"(images {ids})"
        )


def write_source_hint(store: Path, *, coco: Path, annotation_file: Path) -> None:
    """Record the absolute COCO folder and annotation file the store was written from, so that
    ``mfdetr train/eval --cache`` on the same machine need no ``--coco`` (atomic; shards write the same)."""
    import json

    from mfdetr.cache.manifest import SOURCE_HINT

    hint = {"coco_root": str(Path(coco).resolve()), "annotation_path": str(Path(annotation_file).resolve())}
    with contextlib.suppress(OSError, ValueError):
        if json.loads((store / SOURCE_HINT).read_text()) == hint:
            return  # unchanged: nothing written (a complete store may be read-only)
    if isinstance(store, RemotePath):  # one object PUT is atomic
        (store / SOURCE_HINT).write_text(json.dumps(hint, indent=2) + "\n")
        return
    atomic_write_text(store / SOURCE_HINT, json.dumps(hint, indent=2) + "\n", what="source hint", shared=True)


def _dry_run(job: CacheJob, plan: _Plan, summary: CacheSummary, echo: Callable[[str], None]) -> CacheSummary:
    """``--dry-run``: what a run would compute (pending images and those the run's damage check finds)."""
    m, n, out_path = plan.manifest, len(plan.image_ids), store_location(job.out)
    commit = np.zeros(n, dtype=np.uint8)
    damaged, store = 0, None
    if _store_exists(out_path):
        from mfdetr.cache.manifest import check_expectations
        from mfdetr.cache.reader import CacheStore
        from mfdetr.cache.store import adopt_checksum_setting
        from mfdetr.cache.verify import find_damaged

        store = CacheStore.open(out_path)
        want = adopt_checksum_setting(store.manifest, m)
        # a manifest written before codec presets existed is lossless: compare it as such
        check_expectations(
            with_codec_defaults(store.manifest),
            {k: want[k] for k in want if k not in ("created_utc", "arrays", "c1")},
            where=str(out_path),
        )
        commit = read_all_commits(out_path, store.root, store.manifest)
        found = [
            d
            for v in store.views
            for d in find_damaged(store.for_view(v), full=job.repair, indices=range(plan.shard[0], n, plan.shard[1]))
        ]
        commit[[d.index for d in found]] = COMMIT_PENDING
        damaged = len({d.index for d in found})
    todo = _todo(plan, commit, job.retry_skipped)
    est = estimate_bytes(plan, todo, store, c1_mode=job.c1)
    summary.estimate, summary.planned = est, len(todo)
    shard_txt = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard[1] > 1 else ""
    echo(
        f"images: {n} in {job.split}; {int((commit == COMMIT_DONE).sum())} already done; "
        f"{len(todo)} to compute{shard_txt}" + (f" ({damaged} of them damaged)" if damaged else "")
    )
    views_txt = f" --views {','.join(store_views(m))}" if len(store_views(m)) > 1 else ""
    echo(
        f"estimated bytes/image: {_human(est['bytes_per_image'])} with --codec {job.codec} --c1 {job.c1}{views_txt} "
        f"(raw float16, valid region: {_human(est['raw_f16_valid_per_image'])}; raw canvas: "
        f"{_human(est['raw_canvas_per_image'])}; the run's summary prints the measured sizes)"
    )
    echo(
        f"estimated total: {_human(est['total_bytes'])} for {len(todo)} images"
        + ("; C1 recomputed in stage 2: no C1 array" if job.c1 == "recompute" else "")
    )
    for line in format_size_table(est["table"], chosen=(job.codec, job.c1), note=est["ratio_source"], n_images=n):
        echo(line)
    return summary


def _image_sha256(plan: _Plan, image_ids: list[int]) -> list[dict[str, np.ndarray]]:
    return [
        {"image_sha256": np.frombuffer(bytes.fromhex(sha256_file(plan.dataset.image_path(i))), dtype=np.uint8)}
        for i in image_ids
    ]


def _store_exists(path: Path | RemotePath) -> bool:
    if isinstance(path, RemotePath):  # an object-store prefix exists when some object is under it
        return path.exists()
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _prepare_store(
    job: CacheJob, plan: _Plan, detector: FrozenDetector | None, echo: Callable[[str], None]
) -> tuple[Any, dict[str, Any], list[int], FrozenDetector | None]:
    """Open or create the store, validating everything first: an existing store is opened (and compared)
    without writing; when images remain, ``--out`` must be writable and the detector is built (its
    checkpoint loaded) BEFORE a new store is created, so a wrong checkpoint leaves nothing on disk.
    A complete, undamaged store is left untouched (it may be read-only). A ``--c1 recompute`` store's
    manifest holds its stage 0's sha256, so there the detector is built first in any case.
    Returns (root, manifest, indices to compute, detector)."""
    from mfdetr.outputs import check_output_dir

    out_path = store_location(job.out)
    if out_path.exists() and not out_path.is_dir():
        raise MfdetrError("--out must be a folder (the cache store), but it is a file", path=out_path)
    m, extra_files = plan.manifest, None
    if job.c1 == "recompute":
        detector = detector if detector is not None else _build_detector(job)
        m, extra_files = recompute_manifest(plan, detector)
    root = open_for_writing(out_path, m, plan.image_ids, extra_files) if _store_exists(out_path) else None
    if root is not None:
        reset_damaged(out_path, root, plan, full=job.repair, echo=echo)  # their flags become pending
    commit = read_all_commits(out_path, root, m) if root is not None else np.zeros(len(plan.image_ids), dtype=np.uint8)
    todo = _todo(plan, commit, job.retry_skipped)
    if todo:
        if isinstance(out_path, Path):  # object storage: the store's creation is the write test
            check_output_dir(out_path)
        detector = detector if detector is not None else _build_detector(job)
    if root is None:
        root = open_for_writing(out_path, m, plan.image_ids, extra_files)
        todo = _todo(plan, read_all_commits(out_path, root, m), job.retry_skipped)
    try:
        write_source_hint(out_path, coco=job.coco, annotation_file=plan.dataset.annotation_file)
    except OSError:
        if todo:
            raise
    return root, m, todo, detector


def run_cache(
    job: CacheJob,
    *,
    dry_run: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    detector: FrozenDetector | None = None,
) -> CacheSummary:
    """Run (or with ``dry_run`` only estimate) a cache job; see the module doc.

    Args:
        detector: an already built detector (tests, benchmarks); default: built from the registry.
    """
    try:
        return _run_cache(job, dry_run=dry_run, progress=progress, echo=echo, detector=detector)
    except MfdetrError:
        raise
    except Exception as e:
        if not is_remote(job.out) or storage_problem(e) is None:
            raise
        raise remote_error(job.out, e, "write the cache", resumable=True) from None


def _run_cache(
    job: CacheJob, *, dry_run: bool, progress: bool, echo: Callable[[str], None], detector: FrozenDetector | None
) -> CacheSummary:
    t_start = time.perf_counter()
    plan = plan_job(job)
    m = plan.manifest
    out_path = store_location(job.out)
    summary = CacheSummary(store=out_path, shard=plan.shard)
    shard_txt = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard[1] > 1 else ""
    if dry_run:
        return _dry_run(job, plan, summary, echo)

    root, m, todo, detector = _prepare_store(job, plan, detector, echo)
    summary.planned = len(todo)
    views = store_views(m)
    writers = {v: CacheWriter(root=root, path=out_path, manifest=m, view=v) for v in views}
    summary.stats = writers[ORIG].stats
    if todo:
        assert detector is not None
        device = next(iter(detector.parameters()), None) if isinstance(detector, torch.nn.Module) else None
        dev = device.device if device is not None else resolve_device(job.device)
        # queue: batches waiting for a worker (each holds its detector output, on the device)
        bg = BackgroundWriter(writer=writers[ORIG], threads=job.writer_threads, queue_size=max(2, job.writer_threads))
        bar = tqdm(
            total=len(todo) * len(views), unit="img", disable=not progress, desc=f"cache{shard_txt}", dynamic_ncols=True
        )
        failed = True
        t_loop = time.perf_counter()
        try:
            # batches of one input size: detections identical to batch 1 (detectors are not padding-invariant)
            for batch, skips in iterate_batches(
                plan.dataset, num_workers=job.num_workers, batches=same_size_batches(plan.dataset, todo, job.batch_size)
            ):
                for s in skips:
                    for w in writers.values():
                        bg.write_skip(s.index, int(plan.image_ids[s.index]), s.reason, writer=w)
                if batch is not None:
                    for view, w in writers.items():  # every view: its own detector run
                        t0 = time.perf_counter()
                        _detect_and_write(
                            job, plan, m, detector, dev, batch if view == ORIG else flip_batch(batch), bg, w
                        )
                        summary.detect_s += time.perf_counter() - t0
                bar.update(bg.completed - bar.n)
                bar.set_postfix_str(
                    f"written {_human(sum(w.stats.bytes_written for w in writers.values()))}", refresh=False
                )
            failed = False
        finally:
            bg.close(raise_errors=not failed)
            summary.loop_s = time.perf_counter() - t_loop
            bar.update(bg.completed - bar.n)
            bar.close()
    final = read_all_commits(out_path, root, m)
    summary.store_done = int((final == COMMIT_DONE).sum())
    summary.store_skipped = int((final == COMMIT_SKIPPED).sum())
    summary.store_pending = int((final == COMMIT_PENDING).sum())
    summary.store_bytes = stored_bytes(out_path)
    summary.wall_s = time.perf_counter() - t_start
    for line in format_summary(summary):
        echo(line)
    for view in views[1:]:
        st = writers[view].stats
        echo(
            f"view {view}: {st.done} images this run, {len(st.skipped)} skipped, {_human(st.bytes_written)} "
            "written (the lines above count the original view; store counts: every view done)"
        )
    return summary


def _detect_and_write(
    job: CacheJob,
    plan: _Plan,
    m: dict[str, Any],
    detector: Any,
    dev: Any,
    batch: Any,
    bg: BackgroundWriter,
    writer: CacheWriter,
) -> None:
    """Run the detector on one batch (one view of it) and queue its images for ``writer``."""
    layers = list(m["enc_layers"])
    with torch.inference_mode():  # an image the detector cannot process is skipped, recorded
        done, unprocessable = run_or_skip(lambda b: detector.detect(b.to(dev), topk=job.topk, enc_layers=layers), batch)
    for pos, reason in unprocessable:
        iid = batch.image_ids[pos]
        bg.write_skip(plan.dataset.index_of(iid), iid, f"{batch.file_names[pos]}: {reason}", writer=writer)
    for part, out in done:
        _check_output(out, m, part.image_ids)
        extra = None
        if job.c1 == "recompute":  # C1 is not stored: copy a 1x1 corner only, record the files
            out = dataclasses.replace(out, c1=out.c1[..., :1, :1])
            extra = _image_sha256(plan, part.image_ids)
        bg.write_output(
            out,
            indices=[plan.dataset.index_of(i) for i in part.image_ids],
            file_names=part.file_names,
            image_ids=part.image_ids,
            extra=extra,
            writer=writer,
        )


def _build_detector(job: CacheJob) -> FrozenDetector:
    from mfdetr.detectors.registry import build_detector

    return build_detector(job.detector, checkpoint=job.checkpoint, device=str(resolve_device(job.device)))


def format_summary(s: CacheSummary) -> list[str]:
    """The end-of-run report: images done/skipped (with reasons), bytes, per-array compression."""
    st = s.stats
    lines = [
        f"done: {st.done} images this run, {len(st.skipped)} skipped, in {s.wall_s:.1f} s; store {s.store}: "
        f"{s.store_done} done, {s.store_skipped} skipped, {s.store_pending} pending"
    ]
    for index, image_id, reason in st.skipped:
        lines.append(f"  skipped index {index} (image id {image_id}): {reason}")
    lines.append(f"bytes on disk (whole store): {_human(s.store_bytes)}")
    if st.done:
        stored = sum(st.stored.values())
        valid = sum(v for k, v in st.raw_valid.items() if k not in ("commit", "skip_reason"))
        lines.append(
            f"bytes/image: {_human(stored / st.done)} stored; raw (valid region) {_human(valid / st.done)}; "
            f"stored/raw = {stored / max(valid, 1):.3f}"
        )
        lines.append("per array: stored, raw canvas, raw valid, canvas ratio, valid ratio")
        for name in sorted(st.stored):
            if name in ("commit", "skip_reason"):
                continue
            sb, cb, vb = st.stored[name], st.raw_canvas[name], st.raw_valid[name]
            lines.append(
                f"  {name:22s} {_human(sb):>10s} {_human(cb):>10s} {_human(vb):>10s} "
                f"{cb / max(sb, 1):6.2f}x {vb / max(sb, 1):6.2f}x"
            )
    return lines
