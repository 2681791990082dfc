"""The online mode's detector step: the frozen detector run on a batch of images, its outputs laid out as a
cache stores them (:class:`DetectorStep`, the trainer's ``prepare_batch``), and the online evaluation set
(:class:`OnlineEvalSet`). The runs that use them are in :mod:`mfdetr.engine.online`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mfdetr.contracts import DetectorOutput, ImageBatch
from mfdetr.engine.collate import Stage2Batch
from mfdetr.engine.screening import readable_indices, runnable_indices


def zero_padding(det: DetectorOutput) -> DetectorOutput:
    """Cut every map to the batch's largest valid size and zero each image's padding (cache layout)."""
    lv = det.level_valid_hw.cpu()
    enc: dict[int, list[torch.Tensor]] = {}
    for layer, maps in det.enc_maps.items():
        out = []
        for lvl, m in enumerate(maps):
            hmax, wmax = int(lv[:, lvl, 0].max()), int(lv[:, lvl, 1].max())
            m = m[..., :hmax, :wmax].clone()
            for b in range(m.shape[0]):
                m[b, :, int(lv[b, lvl, 0]) :, :] = 0
                m[b, :, :, int(lv[b, lvl, 1]) :] = 0
            out.append(m)
        enc[layer] = out
    ihw = det.input_hw.cpu()
    c1_hw = [(math.ceil(int(h) / 4), math.ceil(int(w) / 4)) for h, w in ihw.tolist()]
    c1 = det.c1[..., : max(h for h, _ in c1_hw), : max(w for _, w in c1_hw)].clone()
    for b, (h, w) in enumerate(c1_hw):
        c1[b, :, h:, :] = 0
        c1[b, :, :, w:] = 0
    return replace(det, enc_maps=enc, c1=c1, extras=dict(det.extras))


def round_features(det: DetectorOutput, dtype: torch.dtype) -> DetectorOutput:
    """Round queries, encoder maps and C1 through ``dtype`` (the cache's float16), back to float32."""

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    rounded = det.map(r)  # the cache keeps boxes and logits exact: those are only made float32
    return replace(rounded, boxes=det.boxes.float(), logits=det.logits.float())


class DetectorStep:
    """``prepare_batch`` of the online mode: ImageBatch → frozen detector → :class:`Stage2Batch`.

    Args:
        detector: the detector on the training device (``eval()``; frozen unless ``grad``).
        topk: queries kept per image (the cache's K).
        enc_layers: encoder layers to return (the MaskNet's ``enc_layer``).
        round_dtype: round features through this dtype (``torch.float16`` = the cache's), or ``None``.
        grad: run with gradients (fine-tuning); otherwise under ``torch.inference_mode``.
        autocast_dtype: run the detector under autocast with this dtype (AMP on GPU), or ``None``.
    """

    def __init__(
        self,
        *,
        detector: Any,
        topk: int,
        enc_layers: Sequence[int],
        round_dtype: torch.dtype | None = torch.float16,
        grad: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.detector = detector
        self.topk = int(topk)
        self.enc_layers = tuple(enc_layers)
        self.round_dtype = round_dtype
        self.grad = bool(grad)
        self.autocast_dtype = autocast_dtype

    def _detect(self, batch: ImageBatch, device: torch.device) -> DetectorOutput:
        amp = (
            torch.autocast(device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            if self.grad:
                return self.detector.detect(batch, topk=self.topk, enc_layers=self.enc_layers, grad=True)
            with torch.inference_mode():
                return self.detector.detect(batch, topk=self.topk, enc_layers=self.enc_layers)

    def __call__(self, batch: ImageBatch, device: torch.device) -> Stage2Batch | ImageStep:
        """The trainer's ``prepare_batch``: the detector's outputs; with ``grad`` only the images moved to
        the device (:class:`ImageStep`: the fine-tuned model runs the detector inside its forward, so
        DDP sees the detector's parameters used there)."""
        if batch.targets is None:
            raise ValueError("online training needs GT targets in the image batch")
        if self.grad:
            return ImageStep(images=batch.to(device), targets=[t.to(device) for t in batch.targets])
        det, targets = self._run_kept(batch, device)
        return Stage2Batch(det=det, targets=[t.to(device) for t in targets])

    def run(self, batch: ImageBatch, device: torch.device) -> DetectorOutput:
        """Detector outputs of ``batch`` in the cache's layout (zero padding, optional float16 rounding)."""
        return self._run_kept(batch, device)[0]

    def _run_kept(self, batch: ImageBatch, device: torch.device) -> tuple[DetectorOutput, list[Any]]:
        """:meth:`run` on the images the detector can process, and their targets: an image it cannot
        process (:func:`mfdetr.data.run_or_skip`) is reported on stderr and left out of the step (not
        with ``grad``: the fine-tuned model's targets travel apart from its images)."""
        import sys

        from mfdetr.data import run_or_skip
        from mfdetr.engine.collate import cat_detector_outputs
        from mfdetr.errors import MfdetrError

        if self.grad:
            done, failed = [(batch, zero_padding(self._detect(batch.to(device), device)))], []
        else:
            done, failed = run_or_skip(lambda b: zero_padding(self._detect(b.to(device), device)), batch)
        for pos, reason in failed:
            print(
                f"mfdetr: left out image id {batch.image_ids[pos]} ({batch.file_names[pos]}): {reason}", file=sys.stderr
            )
        if not done:
            raise MfdetrError(
                f"the detector cannot process image ids {batch.image_ids} "
                f"({', '.join(batch.file_names)}): {failed[0][1]}"
            )
        det = done[0][1] if len(done) == 1 else cat_detector_outputs([o for _, o in done])
        ids = [i for part, _ in done for i in part.image_ids]
        targets = [t for part, _ in done for t in (part.targets or [])]
        if self.round_dtype is not None:
            det = round_features(det, self.round_dtype)
        det = det.to(device, dtype=torch.float32)
        if not self.grad:  # tensors made under inference mode cannot be saved for backward: plain copies
            det = det.map(torch.Tensor.clone, sizes=torch.Tensor.clone)
        det.extras = {"image_id": ids}
        return det, targets


@dataclass
class ImageStep:
    """A training batch whose detector runs inside the model (fine-tuning): unpacks as ``images, targets``."""

    images: ImageBatch
    targets: list[Any]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Any:
        return iter((self.images, self.targets))


def detector_manifest(preset: Any, topk: int) -> dict[str, Any]:
    """The manifest fields MaskNet is built from, taken from a detector preset (no cache involved)."""
    return {
        "hidden_dim": preset.hidden_dim,
        "level_strides": list(preset.level_strides),
        "c1_channels": preset.c1_channels,
        "topk": int(topk),
        "category_map": list(preset.class_to_category),
        "num_classes": preset.num_classes,
        "detector": {"name": preset.name},
    }


class OnlineEvalSet(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A COCO split seen through the detector, image by image (batch 1, like the cache): items
    ``(DetectorOutput B=1, GTInstances)`` as :class:`~mfdetr.engine.cache_data.CacheDataset` gives, so
    :func:`~mfdetr.engine.stage2.evaluate_masknet` evaluates online runs (and fine-tuned detectors).
    Runs the detector in the calling process: use it with ``num_workers = 0``."""

    def __init__(
        self, coco: Any, step: DetectorStep, device: torch.device, max_images: int = 0, coarsest_stride: int = 0
    ) -> None:
        self.coco = coco
        self.step = step
        self.device = device
        n = len(coco) if max_images <= 0 else min(max_images, len(coco))
        #: the images evaluated: readable (header check) and of a size the detector can process
        #: (:func:`runnable_indices`); the others are reported on stderr
        self.indices = runnable_indices(coco, step._detect, device, readable_indices(coco, range(n)), coarsest_stride)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[DetectorOutput, Any] | None:
        """``(detector outputs, GT)``, or ``None`` (reported on stderr) for an image that fails to decode:
        :func:`~mfdetr.engine.stage2.evaluate_masknet` then scores the others."""
        import sys

        from mfdetr.data import collate
        from mfdetr.errors import SkipImage

        try:
            item = self.coco[self.indices[i]]
        except SkipImage as e:
            print(f"mfdetr: skipped {e}", file=sys.stderr)
            return None
        with torch.no_grad():
            det = self.step.run(collate([item]), self.device)
        return det.to("cpu"), item.target


def _detector_step(
    cfg: Any, det_model: Any, topk: int, enc_layer: int, device: torch.device, *, grad: bool
) -> DetectorStep:
    from mfdetr.engine.trainer import amp_settings

    use_amp, amp_dtype = amp_settings(cfg.train.amp, device)
    return DetectorStep(
        detector=det_model,
        topk=topk,
        enc_layers=(enc_layer,),
        round_dtype=torch.float16 if cfg.online.round_features else None,
        grad=grad,
        autocast_dtype=amp_dtype if use_amp else None,
    )


def online_source(
    *, detector: str, checkpoint: str | None, split: str, topk: int, annotation_sha256: str
) -> dict[str, Any]:
    """What an online run trains on (compared on ``--resume``): detector, weights, split, annotations."""
    from mfdetr.cache.manifest import sha256_file

    return {
        "detector": detector,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "split": split,
        "topk": int(topk),
        "annotation_sha256": annotation_sha256,
    }
