"""Per-image latency of the inference path, split by stage (``mfdetr predict --benchmark``).

The stages are the ones ``mfdetr predict`` runs for every image, one image per forward:

- ``preprocess`` — the detector preset's eval transform (resize + normalise) and the batch padding;
- ``detector`` — the frozen detector's ``detect`` (top-K queries, boxes, logits, encoder maps, C1);
- ``masknet`` — the mask network's forward;
- ``postprocess`` — pasting the masks into the original image, scoring them and RLE-encoding them
  (:func:`mfdetr.masknet.masks_to_coco_results`).

Images are the given files, or synthetic random RGB images of a given size. Every image is run
``warmup`` times first (not timed); the report is the mean over ``repeats`` timed runs of every image
(warm). On an accelerator each stage ends with a device synchronisation, so its time is its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mfdetr.errors import MfdetrError, SkipImage

__all__ = ["STAGES", "LatencyReport", "format_report", "measure_latency", "synthetic_images"]

STAGES = ("preprocess", "detector", "masknet", "postprocess")


@dataclass
class LatencyReport:
    """Mean warm seconds per image of every stage, and what was measured."""

    stages: dict[str, float]
    images: int
    repeats: int
    input_hw: list[tuple[int, int]]
    device: str

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_image": dict(self.stages),
            "total": self.total,
            "images": self.images,
            "repeats": self.repeats,
            "input_hw": [list(hw) for hw in self.input_hw],
            "device": self.device,
        }


def synthetic_images(n: int, height: int, width: int, *, seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images of ``height`` × ``width`` (seeded)."""
    if n < 1 or height < 1 or width < 1:
        raise MfdetrError(f"synthetic images need n, height, width >= 1, got {n}, {height}, {width}")
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB") for _ in range(n)]


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` → ``(H, W)``."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MfdetrError(f"--size must be HxW (e.g. 800x1333), got {text!r}") from None
    if h < 1 or w < 1:
        raise MfdetrError(f"--size must be positive, got {text!r}")
    return h, w


def _sync(device: torch.device) -> None:
    if device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


class _Clock:
    """Adds the time since the previous call (or creation) to ``totals[stage]``, after a device sync."""

    def __init__(self, device: torch.device, totals: dict[str, float]) -> None:
        self.device, self.totals = device, totals
        _sync(device)
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.totals[stage] += now - self.last
        self.last = now


def measure_latency(
    images: Sequence[Image.Image],
    *,
    detector: Any,
    masknet: Any,
    device: torch.device,
    preprocessing: Any,
    class_to_category: Sequence[int],
    topk: int,
    enc_layer: int,
    warmup: int = 1,
    repeats: int = 3,
) -> LatencyReport:
    """Time every stage of the inference path on ``images`` (see the module doc).

    Args:
        detector: a frozen detector (``detect``); masknet: the mask network module.
        preprocessing: the detector preset's :class:`~mfdetr.contracts.Preprocessing`.
    """
    from mfdetr.data import CocoItem, EvalTransform, collate
    from mfdetr.masknet import masks_to_coco_results

    if not images:
        raise MfdetrError("no images to benchmark")
    if warmup < 0 or repeats < 1:
        raise MfdetrError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    transform = EvalTransform(preprocessing=preprocessing)
    score = "mask_iou" if getattr(masknet, "mask_scoring", None) is not None else "mask_prob"
    totals = dict.fromkeys(STAGES, 0.0)
    input_hw: list[tuple[int, int]] = []

    def run(img: Image.Image, iid: int, clock: Callable[[str], None]) -> tuple[int, int]:
        t = transform(img)
        batch = collate(
            [
                CocoItem(
                    image=t,
                    image_id=iid,
                    file_name=f"image{iid}",
                    orig_hw=(img.height, img.width),
                    input_hw=(int(t.shape[1]), int(t.shape[2])),
                    target=None,
                )
            ]
        ).to(device)
        clock("preprocess")
        with torch.inference_mode():
            det = detector.detect(batch, topk=topk, enc_layers=(enc_layer,))
            clock("detector")
            mo = masknet(det)
            clock("masknet")
            masks_to_coco_results(mo, det, class_to_category, [iid], score=score, min_score=0.0)
        clock("postprocess")
        return int(t.shape[1]), int(t.shape[2])

    for iid, img in enumerate(images, start=1):
        for _ in range(warmup):
            run(img, iid, lambda stage: None)
        for _ in range(repeats):
            hw = run(img, iid, _Clock(device, totals))
        input_hw.append(hw)
    n = len(images) * repeats
    return LatencyReport(
        stages={k: v / n for k, v in totals.items()},
        images=len(images),
        repeats=repeats,
        input_hw=input_hw,
        device=str(device),
    )


def format_report(report: LatencyReport, *, title: str) -> str:
    """The breakdown as a small table (milliseconds per image and share of the total)."""
    sizes = sorted(set(report.input_hw))
    lines = [
        f"{title}: {report.images} images × {report.repeats} warm runs on {report.device}, network input "
        + ", ".join(f"{h}×{w}" for h, w in sizes),
        f"{'stage':<12} {'ms/image':>10} {'share':>7}",
    ]
    for k, v in report.stages.items():
        lines.append(f"{k:<12} {1000 * v:>10.1f} {100 * v / max(report.total, 1e-12):>6.1f}%")
    lines.append(f"{'total':<12} {1000 * report.total:>10.1f} {100.0:>6.1f}%")
    return "\n".join(lines)


def benchmark_predict(
    *,
    detector: str,
    masknet: Any = None,
    checkpoint: Any = None,
    inputs: Sequence[str] = (),
    size: tuple[int, int] = (800, 1333),
    num_images: int = 2,
    device: str = "auto",
    warmup: int = 1,
    repeats: int = 3,
    random_weights: bool = False,
) -> LatencyReport:
    """Build the inference path of ``mfdetr predict`` and time it on ``inputs`` (image files/folders) or
    on ``num_images`` synthetic images of ``size`` (H, W).

    Args:
        masknet: a MaskNet checkpoint (a run's ``ckpt.pt``); ``None``: the default MaskNet recipe with
            random weights (the cost does not depend on the values).
        random_weights: build the detector with random weights when ``checkpoint`` is ``None`` and the
            preset ships none (benchmarks of released presets without their files).
    """
    from mfdetr.detectors.registry import build_detector, get_preset, load_plugins
    from mfdetr.devices import resolve_device
    from mfdetr.engine.inference.predict import detector_checkpoint, load_masknet_checkpoint, preset_queries

    load_plugins()
    preset = get_preset(detector)
    dev = resolve_device(device)
    if masknet is not None:
        loaded = load_masknet_checkpoint(masknet, preset=preset, device=dev)
        model, cfg, enc_layer = loaded.model, loaded.config, loaded.enc_layer
    else:
        import dataclasses

        from mfdetr.masknet import MaskNetConfig, build_masknet

        cfg = MaskNetConfig()
        enc_layer = min(cfg.enc_layer, preset.num_encoder_layers)
        cfg = dataclasses.replace(cfg, enc_layer=enc_layer)
        model = (
            build_masknet(
                cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
            )
            .to(dev)
            .eval()
        )
    try:
        ckpt = detector_checkpoint(preset, checkpoint)
    except MfdetrError:
        if not random_weights or checkpoint is not None:
            raise
        ckpt = None
    det = build_detector(preset.name, checkpoint=ckpt, device=str(dev))
    images = _benchmark_images(inputs, num_images, size)
    return measure_latency(
        images,
        detector=det,
        masknet=model,
        device=dev,
        preprocessing=preset.preprocessing,
        class_to_category=preset.class_to_category,
        topk=min(cfg.num_queries, preset_queries(preset)),
        enc_layer=enc_layer,
        warmup=warmup,
        repeats=repeats,
    )


def _benchmark_images(inputs: Sequence[str], num_images: int, size: tuple[int, int]) -> list[Any]:
    """The images of ``mfdetr predict --benchmark``: those of ``inputs`` (files/folders), else ``num_images``
    synthetic images of ``size``; a missing or unreadable file is a one-line error."""
    from mfdetr.data import load_rgb
    from mfdetr.engine.inference.predict import expand_inputs

    if not inputs:
        return synthetic_images(num_images, *size)
    files, missing = expand_inputs(inputs)
    if missing:
        raise MfdetrError(f"{missing[0][1]}", path=missing[0][0])
    try:
        return [load_rgb(f) for f in files]
    except SkipImage as e:
        raise MfdetrError(e.reason, path=e.image) from None
