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

The MaskNet checkpoint (:func:`load_masknet_checkpoint`) is the training run's ``ckpt.pt``
(:mod:`mfdetr.engine.trainer`: ``model``, ``masknet_config``, ``meta.detector`` = the identity of the
cache it was trained on: detector name, checkpoint sha256, d, level strides, C1 channels, category
map; ``meta.categories`` = the training annotation file's ids and names) or a plain dict ``{"masknet_config", "model"[, "detector", "class_to_category", "categories",
"enc_layer"]}``. The network is sized by the detector preset (d, level strides, C1 channels).
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

from mfdetr.contracts import DetectorPreset
from mfdetr.devices import resolve_device
from mfdetr.engine.image_files import IMAGE_SUFFIXES, ImageFiles, expand_inputs
from mfdetr.engine.names import COCO_NAMES, category_names
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write_text

__all__ = ["COCO_NAMES", "IMAGE_SUFFIXES", "LoadedMaskNet", "PredictJob", "PredictSummary", "category_names",
           "detector_checkpoint", "expand_inputs", "load_masknet_checkpoint", "preset_queries", "resolve_device",
           "run_predict"]

# ---- the mask network and its checkpoint ---------------------------------------------------------

@dataclass
class LoadedMaskNet:
    """A trained mask network ready for inference, with what its checkpoint records."""

    model: torch.nn.Module
    config: Any  # MaskNetConfig
    enc_layer: int
    class_to_category: tuple[int, ...]
    categories: dict[int, str]
    detector: str | None
    detector_sha256: str | None
    path: Path
    #: detector tensors a fine-tuning run trained (``online.finetune``), to load over the detector's weights
    detector_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _identity(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The detector identity a checkpoint records (engine: ``meta.detector``; plain: top-level keys)."""
    meta = ckpt.get("meta")
    ident = dict(meta.get("detector") or {}) if isinstance(meta, Mapping) else {}
    online = meta.get("online") if isinstance(meta, Mapping) else None
    if isinstance(online, Mapping) and online.get("detector"):
        ident.setdefault("detector.name", online["detector"])
    if "detector" in ckpt and isinstance(ckpt["detector"], str):
        ident.setdefault("detector.name", ckpt["detector"])
    if "class_to_category" in ckpt:
        ident.setdefault("category_map", list(ckpt["class_to_category"]))
    return ident


def _meta(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = ckpt.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def _categories_record(value: Any) -> dict[int, str]:
    """``[{"id", "name"}, ...]`` or ``{id: name}`` → ``{id: name}``."""
    if isinstance(value, Mapping):
        return {int(k): str(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return {int(c["id"]): str(c["name"]) for c in value if isinstance(c, Mapping) and "id" in c and "name" in c}
    return {}


def load_masknet_checkpoint(path: str | Path, *, preset: DetectorPreset, device: torch.device | str = "cpu"
                            ) -> LoadedMaskNet:
    """Load a trained MaskNet for the detector ``preset`` (see the module doc for the formats).

    Raises:
        MfdetrError: missing/unreadable file, not a MaskNet checkpoint, trained on another detector
            (name, d, level strides, C1 channels or class slots differ), or weights that do not fit.
    """
    from mfdetr.config import from_dict
    from mfdetr.engine.checkpoint import load_weights, safe_torch_load
    from mfdetr.masknet import MaskNetConfig, build_masknet

    p = Path(path)
    if not p.is_file():
        raise MfdetrError("MaskNet checkpoint not found", path=p)
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "masknet_config" not in ckpt:
        raise MfdetrError("not a MaskNet checkpoint (needs 'model' and 'masknet_config'; pass a training "
                          "run's ckpt.pt)", path=p)
    cfg = from_dict(MaskNetConfig, dict(ckpt["masknet_config"]), where=f"{p}: masknet_config")
    if "enc_layer" in ckpt and int(ckpt["enc_layer"]) != cfg.enc_layer:
        raise MfdetrError(f"records enc_layer={ckpt['enc_layer']} but masknet_config.enc_layer={cfg.enc_layer}",
                          path=p)
    ident = _identity(ckpt)
    name = ident.get("detector.name")
    if name is not None and name != preset.name:
        raise MfdetrError(f"was trained on the outputs of detector {name!r}, not {preset.name!r} "
                          f"(pass --detector {name})", path=p)
    checks = {"hidden_dim": preset.hidden_dim, "level_strides": list(preset.level_strides),
              "c1_channels": preset.c1_channels, "num_classes": preset.num_classes}
    for key, want in checks.items():
        if key in ident and ident[key] is not None and _plain(ident[key]) != _plain(want):
            raise MfdetrError(f"was trained for a detector with {key}={ident[key]}, {preset.name!r} has {want}", path=p)
    c2c = tuple(int(c) for c in ident.get("category_map") or preset.class_to_category)
    if len(c2c) != preset.num_classes:
        raise MfdetrError(f"records {len(c2c)} class slots, detector {preset.name!r} has {preset.num_classes}",
                          path=p)
    if not 1 <= cfg.enc_layer <= preset.num_encoder_layers:
        raise MfdetrError(f"uses encoder layer {cfg.enc_layer}, detector {preset.name!r} has "
                          f"{preset.num_encoder_layers}", path=p)
    model = build_masknet(cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides,
                          c1_channels=preset.c1_channels)
    from mfdetr.engine.finetune import split_state

    masknet_sd, detector_sd = split_state(ckpt["model"])
    load_weights(model, masknet_sd, path=p, what="its MaskNet config")
    model.eval().requires_grad_(False).to(device)
    return LoadedMaskNet(model=model, config=cfg, enc_layer=cfg.enc_layer, class_to_category=c2c,
                         categories=_categories_record(ckpt.get("categories") or _meta(ckpt).get("categories")),
                         detector=name,
                         detector_sha256=ident.get("checkpoint.sha256"), path=p, detector_tensors=detector_sd)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


# ---- the job -------------------------------------------------------------------------------------

def preset_queries(preset: DetectorPreset) -> int:
    """Queries the detector runs at inference (top-K keeps at most this many)."""
    n = preset.num_queries or preset.arch.get("num_queries")
    return int(n) if n else 100


def detector_checkpoint(preset: DetectorPreset, checkpoint: str | Path | None) -> Path:
    """The detector weights file: ``checkpoint``, else the preset's weights shipped in the package
    (``mfdetr/detectors/weights/<checkpoint_file>``, e.g. the ``demo`` preset)."""
    if checkpoint is not None:
        p = Path(checkpoint)
        if not p.is_file():
            raise MfdetrError("detector checkpoint file not found", path=p)
        return p
    import mfdetr.detectors

    shipped = (Path(mfdetr.detectors.__file__).resolve().parent / "weights" / preset.checkpoint_file
               if preset.checkpoint_file else None)
    if shipped is None or not shipped.is_file():
        raise MfdetrError(f"detector {preset.name!r} ships no weights in this installation: pass --checkpoint FILE"
                          + (f" (expected {shipped})" if shipped is not None else ""))
    return shipped


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


def _segment(detector: Any, mask_net: LoadedMaskNet, device: torch.device, topk: int, min_score: float,
             batch: Any) -> tuple[list[dict[str, Any]], str]:
    """Detector → MaskNet → pasted, scored masks of one batch: ``(COCO results, score mode)``."""
    from mfdetr.masknet import masks_to_coco_results

    det = detector.detect(batch.to(device), topk=topk, enc_layers=(mask_net.enc_layer,))
    mo = mask_net.model(det)
    score_mode = "mask_iou" if mo.iou_pred is not None else "mask_prob"  # eq. 13, else eq. 2
    res = masks_to_coco_results(mo, det, mask_net.class_to_category, batch.image_ids,
                                score=score_mode, min_score=min_score)  # type: ignore[arg-type]
    return res, score_mode


def _write_outputs(out: Path, summary: PredictSummary, *, images: list[dict[str, Any]],
                   results: list[dict[str, Any]], names: Mapping[int, str], meta: dict[str, Any]) -> None:
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


def run_predict(job: PredictJob, *, progress: bool = True, echo: Callable[[str], None] = print,
                warn: Callable[[str], None] | None = None, detector: Any | None = None) -> PredictSummary:
    """Run a prediction job (see the module doc); returns what was written.

    Args:
        detector: an already built frozen detector of ``job.detector`` (e.g. the demo reuses it);
            default: built from the registry with the resolved checkpoint.
    """
    import time

    from functools import partial

    from mfdetr.data import iterate_batches, load_rgb, run_or_skip, same_size_batches
    from mfdetr.detectors.registry import get_preset, load_plugins
    from mfdetr.engine.overlay import draw_overlay, instances_from_results

    t0 = time.perf_counter()
    warn = warn or (lambda s: print(f"mfdetr: {s}", file=sys.stderr))
    if not 0.0 <= job.score_threshold <= 1.0:
        raise MfdetrError(f"--score-threshold must be in [0, 1], got {job.score_threshold}")
    if job.batch_size < 1:
        raise MfdetrError(f"--batch-size must be >= 1, got {job.batch_size}")
    if not job.inputs:
        raise MfdetrError("no input images given")
    load_plugins()
    preset = get_preset(job.detector)
    device = resolve_device(job.device)
    ckpt_path = detector_checkpoint(preset, job.checkpoint) if detector is None else job.checkpoint
    mask_net = load_masknet_checkpoint(job.masknet, preset=preset, device=device)
    if mask_net.detector_sha256 and ckpt_path is not None:
        from mfdetr.cache.manifest import sha256_file

        if sha256_file(ckpt_path) != mask_net.detector_sha256:
            warn(f"warning: {job.masknet} was trained on the outputs of another checkpoint of {preset.name!r} "
                 f"(sha256 {mask_net.detector_sha256[:12]}…, {ckpt_path} differs)")
    names = category_names(mask_net.class_to_category, recorded=mask_net.categories,
                           categories_file=job.categories_file)
    files, missing = expand_inputs(job.inputs)
    summary = PredictSummary(skipped=list(missing))
    for path, reason in missing:
        warn(f"skipped {path}: {reason}")
    if not files:
        raise MfdetrError(f"no image files to process in {', '.join(map(str, job.inputs))}")
    if detector is None:
        from mfdetr.detectors.registry import build_detector

        detector = build_detector(preset.name, checkpoint=ckpt_path, device=str(device))
        if mask_net.detector_tensors:  # a fine-tuning run: its detector tensors replace the checkpoint's
            from mfdetr.engine.finetune import load_finetuned_detector

            load_finetuned_detector(detector, mask_net.detector_tensors)
            echo(f"loaded {len(mask_net.detector_tensors)} fine-tuned detector tensors from {job.masknet}")
    topk = min(mask_net.config.num_queries, preset_queries(preset))
    dataset = ImageFiles(files, preset=preset)
    out = Path(job.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for stale in ("predictions.json", "results.json"):  # an earlier run's: never left looking current
        (out / stale).unlink(missing_ok=True)
    overlay_names = _overlay_names(files)
    images: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    score_mode = "mask_prob"
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    try:
        # batches of one input size: each image is detected as if alone (detectors are not padding-invariant)
        order = same_size_batches(dataset, range(len(dataset)), job.batch_size)
        for batch, skips in iterate_batches(dataset, batches=order, num_workers=job.num_workers):
            for s in skips:
                reason = s.reason.split(": ", 1)[1] if s.reason.startswith(str(s.file_name)) else s.reason
                summary.skipped.append((str(s.file_name), reason))
                warn(f"skipped {s.file_name}: {reason}")
            if batch is None:
                bar.update(len(skips))
                continue
            with torch.inference_mode():  # an image the networks cannot process is skipped with its reason
                done, failed = run_or_skip(partial(_segment, detector, mask_net, device, topk, job.score_threshold),
                                           batch)
            for pos, reason in failed:
                summary.skipped.append((batch.file_names[pos], reason))
                warn(f"skipped {batch.file_names[pos]}: {reason}")
            for part, (res, score_mode) in done:
                for r in res:
                    r["category_name"] = names.get(r["category_id"], f"class {r['category_id']}")
                results.extend(res)
                for b, iid in enumerate(part.image_ids):
                    h0, w0 = (int(v) for v in part.orig_hw[b].tolist())
                    images.append({"id": iid, "file_name": part.file_names[b], "height": h0, "width": w0})
                    if job.overlays:
                        mine = [r for r in res if r["image_id"] == iid]
                        pic = draw_overlay(load_rgb(part.file_names[b]), instances_from_results(mine, names))
                        dst = out / "overlays" / overlay_names[iid - 1]
                        pic.save(dst)
                        summary.overlays.append(dst)
            bar.update(len(skips) + len(batch))
    finally:
        bar.close()
    images.sort(key=lambda im: im["id"])  # input order (batches went by input size)
    results.sort(key=lambda r: r["image_id"])  # stable: each image's own order kept
    rank = {name: k for k, name in enumerate(overlay_names)}
    summary.overlays.sort(key=lambda p: rank.get(p.name, len(rank)))
    summary.images, summary.instances = len(images), len(results)
    _write_outputs(out, summary, images=images, results=results, names=names, meta={
        "detector": preset.name, "detector_checkpoint": str(ckpt_path) if ckpt_path else None,
        "masknet_checkpoint": str(job.masknet), "score_threshold": job.score_threshold, "score": score_mode,
        "topk": topk, "enc_layer": mask_net.enc_layer, "device": str(device)})
    summary.wall_s = time.perf_counter() - t0
    echo(f"predicted {summary.instances} instances (score >= {job.score_threshold:g}) on {summary.images} images"
         f" in {summary.wall_s:.1f} s; skipped {len(summary.skipped)}")
    echo(f"wrote {summary.predictions_json}, {summary.results_json}"
         + (f" and {len(summary.overlays)} overlays in {out / 'overlays'}" if job.overlays else ""))
    return summary
