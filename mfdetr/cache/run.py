"""Stage 1 driver: run a frozen detector over a COCO split into a cache store (``mfdetr cache``).

:func:`run_cache` plans the job (preset, dataset, manifest, this shard's pending images), creates
or reopens the store (race-free, manifest compared), then streams batches: DataLoader → detector →
non-finite check → :class:`~mfdetr.cache.writer.BackgroundWriter`. Rerunning the same command resumes:
only images whose commit flag is unset are computed. Shards (``--shard i/n`` or torchrun's
``RANK``/``WORLD_SIZE``) take the store indices ``i, i+n, i+2n, …``, so they never share an image.
"""

from __future__ import annotations

import copy
import dataclasses
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mfdetr.cache.codecs import DEFAULT_PRESET, get_preset as get_codec_preset, with_codec_defaults
from mfdetr.cache.manifest import build_manifest, sha256_file
from mfdetr.cache.sizes import format_size_table, ratios_for, raw_bytes, size_table
from mfdetr.cache.store import human_bytes as _human
from mfdetr.devices import resolve_device
from mfdetr.cache.location import RemotePath, is_remote, remote_error, storage_problem, store_location
from mfdetr.cache.store import chunk_path, open_for_writing, stored_bytes
from mfdetr.cache.writer import (COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED, BackgroundWriter, CacheWriter,
                                 WriteStats)
from mfdetr.cache.views import ORIG, flip_batch, parse_views, read_all_commits, store_views, view_array_name
from mfdetr.contracts import DetectorOutput, FrozenDetector
from mfdetr.data import CocoInstances, iterate_batches, resized_hw, run_or_skip, same_size_batches
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write_text

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
    codec: str = DEFAULT_PRESET
    repair: bool = False
    c1: str = "store"  # "store" the C1 array, or "recompute" it in stage 2 from the stored stage 0
    views: tuple[str, ...] = (ORIG,)  # image views to store (mfdetr.cache.views): ("orig",) or ("orig", "hflip")


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

    get_codec_preset(job.codec)  # an unknown --codec fails before anything is read
    load_plugins()
    preset = get_preset(job.detector)
    if not Path(job.checkpoint).is_file():
        raise MfdetrError("checkpoint file not found", path=job.checkpoint)
    if job.batch_size < 1 or job.num_workers < 0 or job.writer_threads < 1:
        raise MfdetrError(f"need --batch-size >= 1, --workers >= 0 and --writer-threads >= 1, got "
                          f"{job.batch_size}, {job.num_workers} and {job.writer_threads}")
    if job.c1 not in ("store", "recompute"):
        raise MfdetrError(f"--c1 must be 'store' or 'recompute', got {job.c1!r}")
    dataset = CocoInstances(job.coco, job.split, preprocessing=preset.preprocessing, with_targets=False,
                            annotation_file=job.annotation_file)
    image_ids = np.asarray(dataset.image_ids, dtype=np.int64)
    manifest = build_manifest(
        preset=preset, checkpoint_file=str(job.checkpoint), checkpoint_sha256=sha256_file(job.checkpoint),
        split=job.split, annotation_file=str(dataset.annotation_file),
        annotation_sha256=dataset.annotation_sha256, image_ids=image_ids.tolist(), topk=job.topk,
        enc_layers=job.enc_layers, codec_preset=job.codec, views=parse_views(job.views))
    return _Plan(preset=preset, dataset=dataset, manifest=manifest, image_ids=image_ids,
                 shard=resolve_shard(job.shard))


def estimate_bytes(plan: _Plan, indices: list[int], store: Any | None = None, *,
                   c1_mode: str = "store") -> dict[str, Any]:
    """Estimated bytes of ``indices`` (with the job's codec and C1 mode) and a table of bytes/image and the
    whole split's total under every codec preset and C1 mode, from the annotation's image sizes and the
    shapes (:mod:`mfdetr.cache.sizes`; ratios measured on ``store`` where possible). Every stored view
    (:mod:`mfdetr.cache.views`) holds a full copy of an image's arrays: bytes scale with their number."""
    m = plan.manifest
    nv = len(store_views(m))
    pre = plan.preset.preprocessing
    d, k, c, c1 = m["hidden_dim"], m["topk"], m["num_classes"], m["c1_channels"]
    canvas = 2 * (d * len(m["enc_layers"]) * sum(h * w for h, w in m["canvas"]["level_hw"])
                  + c1 * m["canvas"]["c1_hw"][0] * m["canvas"]["c1_hw"][1]) + k * (2 * d + 4 * 4 + 4 * c)
    canvas *= nv
    hws = []
    for image_id in plan.image_ids.tolist():
        info = plan.dataset.image_info(int(image_id))
        hws.append(resized_hw(int(info["height"]), int(info["width"]), pre.short_side, pre.max_size))
    ratios, note = ratios_for(store)
    def raw_of(sizes: list[tuple[int, int]]) -> dict[str, float]:
        return {key: nv * v for key, v in raw_bytes(m, sizes).items()}

    raw = raw_of([hws[i] for i in indices])
    mine = next(r for r in size_table(raw, len(indices), ratios)
                if r.preset == m["codecs"]["preset"] and r.c1_mode == c1_mode)
    return {"images": len(indices), "bytes_per_image": mine.bytes_per_image,
            "raw_f16_valid_per_image": sum(raw.values()) / max(len(indices), 1),
            "raw_canvas_per_image": float(canvas), "total_bytes": mine.total_bytes, "ratios": ratios,
            "ratio_source": note, "table": size_table(raw_of(hws), len(hws), ratios)}


def _todo(plan: _Plan, commit: np.ndarray, retry_skipped: bool) -> list[int]:
    i, n = plan.shard
    mine = np.arange(i, len(plan.image_ids), n)
    pending = ~np.isin(commit[mine], (COMMIT_DONE, COMMIT_SKIPPED))  # pending, or a damaged commit flag
    if retry_skipped:
        pending |= commit[mine] == COMMIT_SKIPPED
    return mine[pending].tolist()


def reset_damaged(out_path: Path, root: Any, plan: _Plan, *, full: bool, echo: Callable[[str], None]) -> int:
    """Find this shard's damaged images and reset their commit flags to pending (so they are recomputed).

    Always: commit flags outside 0/1/2 and committed images with a missing or empty chunk file (one
    ``stat`` per array and image); with ``full`` (``--repair``) every committed image is also decoded
    (checksums, finite values). Returns how many were reset.
    """
    from mfdetr.cache.reader import CacheStore
    from mfdetr.cache.verify import find_damaged, image_arrays

    mine = range(plan.shard[0], len(plan.image_ids), plan.shard[1])
    written, found = 0, []
    for view in store_views(plan.manifest):  # every view of an image has its own commit flag
        store = CacheStore.open(out_path, view=view)
        written += int((store.commit_flags()[mine] != COMMIT_PENDING).sum())
        found_here = find_damaged(store, full=full, indices=mine)
        commit = root[view_array_name(view, "commit")]
        for d in found_here:
            echo(f"damaged {d.describe()}: recomputing it")
            commit[d.index] = COMMIT_PENDING
            for name in [*image_arrays(store.manifest), "skip_reason"]:  # zarr reads a shard it overwrites
                chunk_path(out_path, store._arrays[name], d.index).unlink(missing_ok=True)
        found += found_here
    if written:
        echo(f"{'repair (every committed image decoded)' if full else 'check of commit flags and chunk files'} of "
             f"{written} written image(s): {len(found)} damaged image(s) to recompute"
             + ("" if full else " (--repair also decodes every image)"))
    return len(found)


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
        check_expectations(with_codec_defaults(store.manifest),
                           {k: want[k] for k in want if k not in ("created_utc", "arrays", "c1")}, where=str(out_path))
        commit = read_all_commits(out_path, store.root, store.manifest)
        found = [d for v in store.views for d in find_damaged(store.for_view(v), full=job.repair,
                                                                 indices=range(plan.shard[0], n, plan.shard[1]))]
        commit[[d.index for d in found]] = COMMIT_PENDING
        damaged = len({d.index for d in found})
    todo = _todo(plan, commit, job.retry_skipped)
    est = estimate_bytes(plan, todo, store, c1_mode=job.c1)
    summary.estimate, summary.planned = est, len(todo)
    shard_txt = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard[1] > 1 else ""
    echo(f"images: {n} in {job.split}; {int((commit == COMMIT_DONE).sum())} already done; "
         f"{len(todo)} to compute{shard_txt}" + (f" ({damaged} of them damaged)" if damaged else ""))
    views_txt = f" --views {','.join(store_views(m))}" if len(store_views(m)) > 1 else ""
    echo(f"estimated bytes/image: {_human(est['bytes_per_image'])} with --codec {job.codec} --c1 {job.c1}{views_txt} "
         f"(raw float16, valid region: {_human(est['raw_f16_valid_per_image'])}; raw canvas: "
         f"{_human(est['raw_canvas_per_image'])}; the run's summary prints the measured sizes)")
    echo(f"estimated total: {_human(est['total_bytes'])} for {len(todo)} images"
         + ("; C1 recomputed in stage 2: no C1 array" if job.c1 == "recompute" else ""))
    for line in format_size_table(est["table"], chosen=(job.codec, job.c1), note=est["ratio_source"], n_images=n):
        echo(line)
    return summary


def _stage0_module(detector: Any, name: str) -> torch.nn.Module:
    """The frozen stage 0 (stem + first backbone stage) that produced the detector's C1."""
    fn = getattr(getattr(detector, "body", None), "stage0", None)
    if not callable(fn):
        raise MfdetrError(f"detector {name} does not expose its backbone's stage 0, so its C1 cannot be "
                          "recomputed: use --c1 store")
    return fn()


def recompute_manifest(plan: _Plan, detector: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A ``--c1 recompute`` store's manifest (no c1 array; the stage 0's sha256) and its stage-0 files
    (:mod:`mfdetr.cache.stage0`), exported from ``detector`` on a seeded random input (on the CPU)."""
    from mfdetr.cache.schema import resolve_array_table
    from mfdetr.cache.stage0 import PROGRAM_FILE, WEIGHTS_FILE, export_stage0, sha256_bytes

    # traced and verified on the CPU (deterministic kernels), whatever device the detector runs on
    module = copy.deepcopy(_stage0_module(detector, plan.preset.name)).cpu()
    pre = plan.preset.preprocessing
    h = min(pre.short_side, 224)
    w = min(pre.max_size, h * 4 // 3 + 3)
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    program, weights = export_stage0(module, example)
    entry = {"mode": "recompute", "stage0": {"program": PROGRAM_FILE, "program_sha256": sha256_bytes(program),
                                             "weights": WEIGHTS_FILE, "weights_sha256": sha256_bytes(weights)}}
    m = {**{k: v for k, v in plan.manifest.items() if k != "arrays"}, "c1": entry}
    m["arrays"] = [a.name for a in resolve_array_table(m)]
    return m, {PROGRAM_FILE: program, WEIGHTS_FILE: weights}


def _image_sha256(plan: _Plan, image_ids: list[int]) -> list[dict[str, np.ndarray]]:
    return [{"image_sha256": np.frombuffer(bytes.fromhex(sha256_file(plan.dataset.image_path(i))), dtype=np.uint8)}
            for i in image_ids]


def _store_exists(path: Path | RemotePath) -> bool:
    if isinstance(path, RemotePath):  # an object-store prefix exists when some object is under it
        return path.exists()
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _prepare_store(job: CacheJob, plan: _Plan, detector: FrozenDetector | None, echo: Callable[[str], None]
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
    commit = (read_all_commits(out_path, root, m) if root is not None
              else np.zeros(len(plan.image_ids), dtype=np.uint8))
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


def run_cache(job: CacheJob, *, dry_run: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print, detector: FrozenDetector | None = None) -> CacheSummary:
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


def _run_cache(job: CacheJob, *, dry_run: bool, progress: bool, echo: Callable[[str], None],
               detector: FrozenDetector | None) -> CacheSummary:
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
        bar = tqdm(total=len(todo) * len(views), unit="img", disable=not progress, desc=f"cache{shard_txt}",
                   dynamic_ncols=True)
        failed = True
        t_loop = time.perf_counter()
        try:
            # batches of one input size: detections identical to batch 1 (detectors are not padding-invariant)
            for batch, skips in iterate_batches(plan.dataset, num_workers=job.num_workers,
                                                batches=same_size_batches(plan.dataset, todo, job.batch_size)):
                for s in skips:
                    for w in writers.values():
                        bg.write_skip(s.index, int(plan.image_ids[s.index]), s.reason, writer=w)
                if batch is not None:
                    for view, w in writers.items():  # every view: its own detector run
                        t0 = time.perf_counter()
                        _detect_and_write(job, plan, m, detector, dev, batch if view == ORIG else flip_batch(batch),
                                          bg, w)
                        summary.detect_s += time.perf_counter() - t0
                bar.update(bg.completed - bar.n)
                bar.set_postfix_str(f"written {_human(sum(w.stats.bytes_written for w in writers.values()))}",
                                    refresh=False)
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
        echo(f"view {view}: {st.done} images this run, {len(st.skipped)} skipped, {_human(st.bytes_written)} "
             "written (the lines above count the original view; store counts: every view done)")
    return summary


def _detect_and_write(job: CacheJob, plan: _Plan, m: dict[str, Any], detector: Any, dev: Any, batch: Any,
                      bg: BackgroundWriter, writer: CacheWriter) -> None:
    """Run the detector on one batch (one view of it) and queue its images for ``writer``."""
    layers = list(m["enc_layers"])
    with torch.inference_mode():  # an image the detector cannot process is skipped, recorded
        done, unprocessable = run_or_skip(
            lambda b: detector.detect(b.to(dev), topk=job.topk, enc_layers=layers), batch)
    for pos, reason in unprocessable:
        iid = batch.image_ids[pos]
        bg.write_skip(plan.dataset.index_of(iid), iid, f"{batch.file_names[pos]}: {reason}", writer=writer)
    for part, out in done:
        _check_output(out, m, part.image_ids)
        extra = None
        if job.c1 == "recompute":  # C1 is not stored: copy a 1x1 corner only, record the files
            out = dataclasses.replace(out, c1=out.c1[..., :1, :1])
            extra = _image_sha256(plan, part.image_ids)
        bg.write_output(out, indices=[plan.dataset.index_of(i) for i in part.image_ids],
                        file_names=part.file_names, image_ids=part.image_ids, extra=extra, writer=writer)


def _build_detector(job: CacheJob) -> FrozenDetector:
    from mfdetr.detectors.registry import build_detector

    return build_detector(job.detector, checkpoint=job.checkpoint, device=str(resolve_device(job.device)))


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


__all__ = ["CacheJob", "CacheSummary", "estimate_bytes", "format_summary",
           "parse_shard", "plan_job", "resolve_shard", "run_cache"]
