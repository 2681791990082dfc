"""Online mode: the frozen detector runs in the training loop instead of being read from a cache.

The loop is the same (:func:`mfdetr.engine.trainer.train`); only the data path differs:

- the dataset is the COCO split itself (:class:`mfdetr.data.CocoInstances`: preprocessed images + GT),
  batched into an :class:`~mfdetr.contracts.ImageBatch` by :func:`mfdetr.data.collate`;
- :class:`DetectorStep` (the trainer's ``prepare_batch``) moves the images to the device, runs the
  frozen detector under ``torch.inference_mode`` and returns the same :class:`Stage2Batch` a cache
  would give: encoder maps and C1 cut to the batch's largest valid size with zero padding beyond each
  image's valid region (what the cache stores), features optionally rounded through the cache's
  float16 so that cached and online training see identical inputs (issue 7, item 3).

This is where augmentation of the images (large-scale jitter, Table 13) and partial fine-tuning of the
detector (Table 11) belong; neither is implemented yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mfdetr.contracts import DetectorOutput, ImageBatch
from mfdetr.engine.collate import Stage2Batch


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
                m[b, :, int(lv[b, lvl, 0]):, :] = 0
                m[b, :, :, int(lv[b, lvl, 1]):] = 0
            out.append(m)
        enc[layer] = out
    ihw = det.input_hw.cpu()
    c1_hw = [(math.ceil(int(h) / 4), math.ceil(int(w) / 4)) for h, w in ihw.tolist()]
    c1 = det.c1[..., : max(h for h, _ in c1_hw), : max(w for _, w in c1_hw)].clone()
    for b, (h, w) in enumerate(c1_hw):
        c1[b, :, h:, :] = 0
        c1[b, :, :, w:] = 0
    return DetectorOutput(queries=det.queries, boxes=det.boxes, logits=det.logits, enc_maps=enc, c1=c1,
                          input_hw=det.input_hw, orig_hw=det.orig_hw, level_valid_hw=det.level_valid_hw,
                          extras=dict(det.extras))


def round_features(det: DetectorOutput, dtype: torch.dtype) -> DetectorOutput:
    """Round queries, encoder maps and C1 through ``dtype`` (the cache's float16), back to float32."""
    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    return DetectorOutput(queries=r(det.queries), boxes=det.boxes.float(), logits=det.logits.float(),
                          enc_maps={k: [r(m) for m in v] for k, v in det.enc_maps.items()}, c1=r(det.c1),
                          input_hw=det.input_hw, orig_hw=det.orig_hw, level_valid_hw=det.level_valid_hw,
                          extras=dict(det.extras))


class DetectorStep:
    """``prepare_batch`` of the online mode: ImageBatch → frozen detector → :class:`Stage2Batch`.

    Args:
        detector: a frozen detector (``eval()``, no gradients) on the training device.
        topk: queries kept per image (the cache's K).
        enc_layers: encoder layers to return (the MaskNet's ``enc_layer``).
        round_dtype: round features through this dtype (``torch.float16`` = the cache's), or ``None``.
    """

    def __init__(self, *, detector: Any, topk: int, enc_layers: Sequence[int],
                 round_dtype: torch.dtype | None = torch.float16) -> None:
        self.detector = detector
        self.topk = int(topk)
        self.enc_layers = tuple(enc_layers)
        self.round_dtype = round_dtype

    @torch.inference_mode()
    def _detect(self, batch: ImageBatch) -> DetectorOutput:
        return self.detector.detect(batch, topk=self.topk, enc_layers=self.enc_layers)

    def __call__(self, batch: ImageBatch, device: torch.device) -> Stage2Batch:
        if batch.targets is None:
            raise ValueError("online training needs GT targets in the image batch")
        det = zero_padding(self._detect(batch.to(device)))
        if self.round_dtype is not None:
            det = round_features(det, self.round_dtype)
        det = det.to(device, dtype=torch.float32)
        # tensors made under inference mode cannot be saved for backward: plain copies for MaskNet
        det = DetectorOutput(queries=det.queries.clone(), boxes=det.boxes.clone(), logits=det.logits.clone(),
                             enc_maps={k: [m.clone() for m in v] for k, v in det.enc_maps.items()}, c1=det.c1.clone(),
                             input_hw=det.input_hw.clone(), orig_hw=det.orig_hw.clone(),
                             level_valid_hw=det.level_valid_hw.clone(), extras={"image_id": list(batch.image_ids)})
        return Stage2Batch(det=det, targets=[t.to(device) for t in batch.targets])


def detector_manifest(preset: Any, topk: int) -> dict[str, Any]:
    """The manifest fields MaskNet is built from, taken from a detector preset (no cache involved)."""
    return {"hidden_dim": preset.hidden_dim, "level_strides": list(preset.level_strides),
            "c1_channels": preset.c1_channels, "topk": int(topk), "category_map": list(preset.class_to_category),
            "num_classes": preset.num_classes, "detector": {"name": preset.name}}


def train_online(cfg: Any, *, detector: str, checkpoint: str | None, coco: str, split: str = "train2017",
                 out: str, topk: int = 100, resume: bool = False, round_dtype: torch.dtype | None = torch.float16
                 ) -> Any:
    """``mfdetr train --online``: the same training with the frozen detector run in the loop."""
    from functools import partial

    from mfdetr.data import CocoInstances, collate
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.engine.distributed import init_distributed
    from mfdetr.engine.stage2 import build_parts, resolve_masknet_config
    from mfdetr.engine.trainer import train

    ctx = init_distributed(cfg.train.device)
    preset = get_preset(detector)
    det_model = build_detector(detector, checkpoint=checkpoint, device=str(ctx.device))
    mcfg = resolve_masknet_config(cfg)
    dataset = CocoInstances(coco, split, preprocessing=preset.preprocessing, with_targets=True)
    if cfg.data.max_images > 0:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.data.max_images, len(dataset))))
    parts = build_parts(cfg, detector_manifest(preset, topk))
    step = DetectorStep(detector=det_model, topk=topk, enc_layers=(mcfg.enc_layer,), round_dtype=round_dtype)
    from mfdetr.config import to_dict

    return train(cfg=cfg, model=parts.model, criterion=parts.criterion, train_set=dataset, run_dir=out,
                 collate=partial(collate), resume=resume, masknet_config=to_dict(parts.masknet_cfg),
                 record={"online": {"detector": detector, "checkpoint": str(checkpoint), "coco": str(coco),
                                    "split": split, "topk": topk}},
                 ctx=ctx, prepare_batch=step)
