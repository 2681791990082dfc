"""End-to-end inference on image files (``mfdetr predict``): frozen detector → MaskNet → masks.

For each image (files, and the image files directly inside given folders, sorted by name):
load as 8-bit RGB, apply the detector preset's eval preprocessing, run the frozen detector
(``detect``: top-K queries, boxes, logits, encoder maps, C1 — the same tensors the cache stores), run
the trained mask network on them, paste and score the masks (eq. 2 / eq. 13, via
:func:`mfdetr.masknet.masks_to_coco_results`), keep the results scoring ``>= score_threshold``.

Outputs in ``out``:

- ``predictions.json`` — self-describing: ``images`` (id, file_name, height, width), ``categories``
  (id, name), ``annotations`` (the kept results: ``image_id``, ``category_id``, ``category_name``,
  ``score``, ``bbox`` xywh in original pixels, ``segmentation`` as COCO RLE with str counts),
  ``skipped`` (file_name, reason) and a ``meta`` record (detector, checkpoints, threshold, score mode);
- ``results.json`` — the same annotations as a plain COCO results list (``COCO.loadRes``-ready);
- ``overlays/<image stem>.png`` — the image at its original size with masks, boxes, labels, scores.

Unreadable images (missing, corrupt, not an image, over :data:`mfdetr.data.images.MAX_PIXELS`) and
images the networks cannot process are reported on stderr, listed under ``skipped`` and left out;
they never stop the run.

Outputs are written atomically and ``predictions.json`` last: it marks a complete run. A run first
deletes the ``predictions.json`` and ``results.json`` an earlier run left in ``out`` (overlay PNGs are
overwritten image by image), so after a crash ``out`` holds no result that looks complete or current.

The MaskNet checkpoint and the category names: :mod:`mfdetr.engine.inference.masknet_checkpoint`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mfdetr.devices import resolve_device
from mfdetr.outputs import atomic_write_text
from mfdetr.engine.inference.image_files import IMAGE_SUFFIXES, ImageFiles, expand_inputs
from mfdetr.engine.inference.masknet_checkpoint import (
    COCO_NAMES,
    LoadedMaskNet,
    category_names,
    detector_checkpoint,
    load_masknet_checkpoint,
    preset_queries,
)
from mfdetr.errors import MfdetrError

__all__ = [
    "COCO_NAMES",
    "IMAGE_SUFFIXES",
    "LoadedMaskNet",
    "PredictJob",
    "PredictSummary",
    "category_names",
    "detector_checkpoint",
    "expand_inputs",
    "load_masknet_checkpoint",
    "preset_queries",
    "resolve_device",
    "run_predict",
]

# ---- the job -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictJob:
    """What ``mfdetr predict`` was asked to do (see the CLI for each option)."""

    detector: str
    masknet: Path
    inputs: tuple[str, ...]
    out: Path
    checkpoint: Path | None = None
    score_threshold: float = 0.3
    device: str = "auto"
    batch_size: int = 1
    num_workers: int = 0
    overlays: bool = True
    categories_file: Path | None = None


@dataclass
class PredictSummary:
    """What a run produced."""

    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    instances: int = 0
    predictions_json: Path | None = None
    results_json: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


def _overlay_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per file, made unique with ``_<n>`` when stems repeat."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        stem = f.stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return out


def _segment(
    detector: Any, mask_net: LoadedMaskNet, device: torch.device, topk: int, min_score: float, batch: Any
) -> tuple[list[dict[str, Any]], str]:
    """Detector → MaskNet → pasted, scored masks of one batch: ``(COCO results, score mode)``."""
    from mfdetr.masknet import masks_to_coco_results

    det = detector.detect(batch.to(device), topk=topk, enc_layers=(mask_net.enc_layer,))
    mo = mask_net.model(det)
    score_mode = "mask_iou" if mo.iou_pred is not None else "mask_prob"  # eq. 13, else eq. 2
    res = masks_to_coco_results(
        mo, det, mask_net.class_to_category, batch.image_ids, score=score_mode, min_score=min_score
    )  # type: ignore[arg-type]
    return res, score_mode


def _write_outputs(
    out: Path,
    summary: PredictSummary,
    *,
    images: list[dict[str, Any]],
    results: list[dict[str, Any]],
    names: Mapping[int, str],
    meta: dict[str, Any],
) -> None:
    """``results.json``, then ``predictions.json`` (the mark of a complete run), each written atomically."""
    record = {
        "info": {"description": "mfdetr predict: frozen detector + Mask Frozen-DETR mask network"},
        "images": images,
        "categories": [{"id": i, "name": n} for i, n in sorted(names.items())],
        "annotations": [{"id": k + 1, **r} for k, r in enumerate(results)],
        "skipped": [{"file_name": f, "reason": r} for f, r in summary.skipped],
        "meta": meta,
    }
    summary.results_json = out / "results.json"
    atomic_write_text(summary.results_json, json.dumps(results) + "\n")
    summary.predictions_json = out / "predictions.json"
    atomic_write_text(summary.predictions_json, json.dumps(record) + "\n")


@dataclass
class _Setup:
    """What a prediction job runs with, once its inputs are checked."""

    preset: Any
    device: torch.device
    detector_checkpoint: Path | None
    mask_net: LoadedMaskNet
    names: dict[int, str]
    files: list[Path]
    detector: Any
    topk: int


def _check(job: PredictJob) -> None:
    if not 0.0 <= job.score_threshold <= 1.0:
        raise MfdetrError(f"--score-threshold must be in [0, 1], got {job.score_threshold}")
    if job.batch_size < 1:
        raise MfdetrError(f"--batch-size must be >= 1, got {job.batch_size}")
    if not job.inputs:
        raise MfdetrError("no input images given")


def _set_up(
    job: PredictJob,
    summary: PredictSummary,
    detector: Any | None,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> _Setup:
    """Preset, device, mask network (checked against the detector weights), category names, input files
    (the missing ones skipped) and the detector."""
    from mfdetr.detectors.registry import build_detector, get_preset, load_plugins

    load_plugins()
    preset = get_preset(job.detector)
    device = resolve_device(job.device)
    ckpt_path = detector_checkpoint(preset, job.checkpoint) if detector is None else job.checkpoint
    mask_net = load_masknet_checkpoint(job.masknet, preset=preset, device=device)
    if mask_net.detector_sha256 and ckpt_path is not None:
        from mfdetr.cache.manifest import sha256_file

        if sha256_file(ckpt_path) != mask_net.detector_sha256:
            warn(
                f"warning: {job.masknet} was trained on the outputs of another checkpoint of {preset.name!r} "
                f"(sha256 {mask_net.detector_sha256[:12]}…, {ckpt_path} differs)"
            )
    names = category_names(
        mask_net.class_to_category, recorded=mask_net.categories, categories_file=job.categories_file
    )
    files, missing = expand_inputs(job.inputs)
    summary.skipped.extend(missing)
    for path, reason in missing:
        warn(f"skipped {path}: {reason}")
    if not files:
        raise MfdetrError(f"no image files to process in {', '.join(map(str, job.inputs))}")
    if detector is None:
        detector = build_detector(preset.name, checkpoint=ckpt_path, device=str(device))
        if mask_net.detector_tensors:  # a fine-tuning run: its detector tensors replace the checkpoint's
            from mfdetr.engine.finetune import load_finetuned_detector

            load_finetuned_detector(detector, mask_net.detector_tensors)
            echo(f"loaded {len(mask_net.detector_tensors)} fine-tuned detector tensors from {job.masknet}")
    return _Setup(
        preset=preset,
        device=device,
        detector_checkpoint=ckpt_path,
        mask_net=mask_net,
        names=names,
        files=files,
        detector=detector,
        topk=min(mask_net.config.num_queries, preset_queries(preset)),
    )


def _predict_all(
    job: PredictJob, su: _Setup, summary: PredictSummary, out: Path, progress: bool, warn: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Every input through the networks: ``(images, results, score mode)``; overlays written as they come."""
    from functools import partial

    from mfdetr.data import iterate_batches, load_rgb, run_or_skip, same_size_batches
    from mfdetr.engine.inference.overlay import draw_overlay, instances_from_results

    dataset = ImageFiles(su.files, preset=su.preset)
    overlay_names = _overlay_names(su.files)
    images: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    score_mode = "mask_prob"
    segment = partial(_segment, su.detector, su.mask_net, su.device, su.topk, job.score_threshold)
    bar = tqdm(total=len(su.files), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    try:
        # batches of one input size: each image is detected as if alone (detectors are not padding-invariant)
        order = same_size_batches(dataset, range(len(dataset)), job.batch_size)
        for batch, skips in iterate_batches(dataset, batches=order, num_workers=job.num_workers):
            for sk in skips:
                reason = sk.reason.split(": ", 1)[1] if sk.reason.startswith(str(sk.file_name)) else sk.reason
                summary.skipped.append((str(sk.file_name), reason))
                warn(f"skipped {sk.file_name}: {reason}")
            if batch is None:
                bar.update(len(skips))
                continue
            with torch.inference_mode():  # an image the networks cannot process is skipped with its reason
                done, failed = run_or_skip(segment, batch)
            for pos, reason in failed:
                summary.skipped.append((batch.file_names[pos], reason))
                warn(f"skipped {batch.file_names[pos]}: {reason}")
            for part, (res, score_mode) in done:
                for r in res:
                    r["category_name"] = su.names.get(r["category_id"], f"class {r['category_id']}")
                results.extend(res)
                for b, iid in enumerate(part.image_ids):
                    h0, w0 = (int(v) for v in part.orig_hw[b].tolist())
                    images.append({"id": iid, "file_name": part.file_names[b], "height": h0, "width": w0})
                    if job.overlays:
                        mine = [r for r in res if r["image_id"] == iid]
                        pic = draw_overlay(load_rgb(part.file_names[b]), instances_from_results(mine, su.names))
                        dst = out / "overlays" / overlay_names[iid - 1]
                        pic.save(dst)
                        summary.overlays.append(dst)
            bar.update(len(skips) + len(batch))
    finally:
        bar.close()
    rank = {name: k for k, name in enumerate(overlay_names)}
    summary.overlays.sort(key=lambda p: rank.get(p.name, len(rank)))
    return images, results, score_mode


def run_predict(
    job: PredictJob,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    detector: Any | None = None,
) -> PredictSummary:
    """Run a prediction job (see the module doc); returns what was written.

    Args:
        detector: an already built frozen detector of ``job.detector`` (e.g. the demo reuses it);
            default: built from the registry with the resolved checkpoint.
    """
    import time

    t0 = time.perf_counter()
    warn = warn or (lambda s: print(f"mfdetr: {s}", file=sys.stderr))
    _check(job)
    summary = PredictSummary()
    su = _set_up(job, summary, detector, echo, warn)
    out = Path(job.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for stale in ("predictions.json", "results.json"):  # an earlier run's: never left looking current
        (out / stale).unlink(missing_ok=True)
    images, results, score_mode = _predict_all(job, su, summary, out, progress, warn)
    images.sort(key=lambda im: im["id"])  # input order (batches went by input size)
    results.sort(key=lambda r: r["image_id"])  # stable: each image's own order kept
    summary.images, summary.instances = len(images), len(results)
    _write_outputs(
        out,
        summary,
        images=images,
        results=results,
        names=su.names,
        meta={
            "detector": su.preset.name,
            "score_threshold": job.score_threshold,
            "score": score_mode,
            "detector_checkpoint": str(su.detector_checkpoint) if su.detector_checkpoint else None,
            "masknet_checkpoint": str(job.masknet),
            "topk": su.topk,
            "enc_layer": su.mask_net.enc_layer,
            "device": str(su.device),
        },
    )
    summary.wall_s = time.perf_counter() - t0
    echo(
        f"predicted {summary.instances} instances (score >= {job.score_threshold:g}) on {summary.images} images"
        f" in {summary.wall_s:.1f} s; skipped {len(summary.skipped)}"
    )
    echo(
        f"wrote {summary.predictions_json}, {summary.results_json}"
        + (f" and {len(summary.overlays)} overlays in {out / 'overlays'}" if job.overlays else "")
    )
    return summary
