"""Online mode: the frozen detector runs in the training loop instead of being read from a cache.

The loop is the same (:func:`mfdetr.engine.trainer.train`); only the data path differs:

- the dataset is the COCO split itself (:class:`mfdetr.data.CocoInstances`: preprocessed images + GT),
  batched into an :class:`~mfdetr.contracts.ImageBatch` by :func:`mfdetr.data.collate`;
- :class:`DetectorStep` (the trainer's ``prepare_batch``) moves the images to the device, runs the
  frozen detector under ``torch.inference_mode`` and returns the same :class:`Stage2Batch` a cache
  would give: encoder maps and C1 cut to the batch's largest valid size with zero padding beyond each
  image's valid region (what the cache stores), features optionally rounded through the cache's
  float16 so that cached and online training see identical inputs.

Also the online-only options of ``[online]`` (:class:`~mfdetr.engine.config.OnlineConfig`):
large-scale jitter of the training images (Table 13, :class:`mfdetr.data.LargeScaleJitter`) and
fine-tuning of the detector with MaskNet's losses (Table 11, :mod:`mfdetr.engine.finetune`; the
detector then runs with gradients and under the run's autocast).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mfdetr.contracts import DetectorOutput, ImageBatch
from mfdetr.engine.collate import Stage2Batch
from mfdetr.engine.screening import readable_indices, runnable_indices

if TYPE_CHECKING:
    from mfdetr.engine.config import RunConfig
    from mfdetr.engine.sweep import SweepSpec, VariantResult
    from mfdetr.engine.trainer import TrainResult


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

    def __init__(self, *, detector: Any, topk: int, enc_layers: Sequence[int],
                 round_dtype: torch.dtype | None = torch.float16, grad: bool = False,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.detector = detector
        self.topk = int(topk)
        self.enc_layers = tuple(enc_layers)
        self.round_dtype = round_dtype
        self.grad = bool(grad)
        self.autocast_dtype = autocast_dtype

    def _detect(self, batch: ImageBatch, device: torch.device) -> DetectorOutput:
        amp = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
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
            print(f"mfdetr: left out image id {batch.image_ids[pos]} ({batch.file_names[pos]}): {reason}",
                  file=sys.stderr)
        if not done:
            raise MfdetrError(f"the detector cannot process image ids {batch.image_ids} "
                              f"({', '.join(batch.file_names)}): {failed[0][1]}")
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
    return {"hidden_dim": preset.hidden_dim, "level_strides": list(preset.level_strides),
            "c1_channels": preset.c1_channels, "topk": int(topk), "category_map": list(preset.class_to_category),
            "num_classes": preset.num_classes, "detector": {"name": preset.name}}


class OnlineEvalSet(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A COCO split seen through the detector, image by image (batch 1, like the cache): items
    ``(DetectorOutput B=1, GTInstances)`` as :class:`~mfdetr.engine.cache_data.CacheDataset` gives, so
    :func:`~mfdetr.engine.stage2.evaluate_masknet` evaluates online runs (and fine-tuned detectors).
    Runs the detector in the calling process: use it with ``num_workers = 0``."""

    def __init__(self, coco: Any, step: DetectorStep, device: torch.device, max_images: int = 0,
                 coarsest_stride: int = 0) -> None:
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


def _detector_step(cfg: Any, det_model: Any, topk: int, enc_layer: int, device: torch.device, *,
                   grad: bool) -> DetectorStep:
    from mfdetr.engine.trainer import amp_settings

    use_amp, amp_dtype = amp_settings(cfg.train.amp, device)
    return DetectorStep(detector=det_model, topk=topk, enc_layers=(enc_layer,),
                        round_dtype=torch.float16 if cfg.online.round_features else None, grad=grad,
                        autocast_dtype=amp_dtype if use_amp else None)


def online_source(*, detector: str, checkpoint: str | None, split: str, topk: int,
                  annotation_sha256: str) -> dict[str, Any]:
    """What an online run trains on (compared on ``--resume``): detector, weights, split, annotations."""
    from mfdetr.cache.manifest import sha256_file

    return {"detector": detector, "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
            "split": split, "topk": int(topk), "annotation_sha256": annotation_sha256}


def train_online(cfg: RunConfig, *, detector: str, checkpoint: str | None, coco: str, split: str = "train2017",
                 out: str, topk: int = 100, resume: bool = False, val_split: str | None = None) -> TrainResult:
    """``mfdetr train --online``: the same training with the detector run in the loop (``cfg.online``:
    large-scale jitter, fine-tuning, rounding through the cache dtype); evaluated on ``val_split``
    (through the detector as it is at that step) at the end and every ``train.eval_every`` steps."""
    from functools import partial

    from mfdetr.config import to_dict
    from mfdetr.data import CocoInstances, LargeScaleJitter, SkipReplace, collate
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.contracts import default_enc_layer
    from mfdetr.engine.config import with_default_enc_layer
    from mfdetr.engine.distributed import init_distributed
    from mfdetr.engine.finetune import FineTuned
    from mfdetr.engine.stage2 import (build_parts, evaluate_and_record, flat_metrics, resolve_masknet_config,
                                      training_model)
    from mfdetr.engine.trainer import train
    from mfdetr.engine.training.models import FineTunedModel

    oc = cfg.online
    ctx = init_distributed(cfg.train.device)
    preset = get_preset(detector)
    cfg = with_default_enc_layer(cfg, default_enc_layer(preset.num_encoder_layers))
    det_model = build_detector(detector, checkpoint=checkpoint, device=str(ctx.device))
    mcfg = resolve_masknet_config(cfg)
    base = CocoInstances(coco, split, preprocessing=preset.preprocessing, with_targets=True)
    dataset: Any = base
    coarsest = max(preset.level_strides)
    if oc.lsj:  # random windows: an image the detector cannot process is left out of its step instead
        dataset = LargeScaleJitter(base, size=oc.lsj_size, min_scale=oc.lsj_min_scale, max_scale=oc.lsj_max_scale,
                                   seed=cfg.train.seed)
    else:
        probe = _detector_step(cfg, det_model, topk, mcfg.enc_layer, ctx.device, grad=False)
        kept = runnable_indices(base, probe._detect, ctx.device, range(len(base)), coarsest)
        if len(kept) < len(base):
            dataset = torch.utils.data.Subset(base, kept)
    dataset = SkipReplace(dataset)  # an unreadable image: the next one takes its place (reported)
    if cfg.data.max_images > 0:
        dataset = _Subset(dataset, min(cfg.data.max_images, len(dataset)))
    manifest = detector_manifest(preset, topk)
    parts = build_parts(cfg, manifest)
    model: Any = training_model(parts)  # MaskNet on the positives only
    finetune = oc.finetune != "none"
    step = _detector_step(cfg, det_model, topk, mcfg.enc_layer, ctx.device, grad=finetune)
    if finetune:
        model = FineTunedModel(FineTuned(model.network, det_model, mode=oc.finetune, detector_step=step,
                                         detector_lr_mult=oc.detector_lr_mult), parts.criterion, assigns_targets=True)
    evaluate_fn = None
    if val_split:
        val = OnlineEvalSet(CocoInstances(coco, val_split, preprocessing=preset.preprocessing, with_targets=True),
                            _detector_step(cfg, det_model, topk, mcfg.enc_layer, ctx.device, grad=False), ctx.device,
                            max_images=cfg.data.max_images, coarsest_stride=coarsest)

        def evaluate_fn(m: torch.nn.Module, at: int) -> dict[str, float]:
            r = evaluate_and_record(parts.model, val, manifest=manifest, cfg=cfg, out=Path(out), step=at,
                                    device=val.device)
            return flat_metrics(r)

    source = online_source(detector=detector, checkpoint=checkpoint, split=split, topk=topk,
                           annotation_sha256=base.annotation_sha256)
    if resume:
        from mfdetr.engine.checkpoint import check_resume_source

        check_resume_source(out, key="online_source", current=source, what="detector or training data")
    return train(cfg=cfg, model=model, train_set=dataset, run_dir=out,
                 collate=partial(collate), resume=resume, masknet_config=to_dict(parts.masknet_cfg),
                 record={"online": {"detector": detector, "checkpoint": str(checkpoint), "coco": str(coco),
                                    "split": split, "val_split": val_split, "topk": topk, "lsj": oc.lsj,
                                    "finetune": oc.finetune}, "online_source": source,
                         "detector": {"detector.name": preset.name, "num_classes": preset.num_classes,
                                      "category_map": list(preset.class_to_category)},
                         "categories": [{"id": int(c["id"]), "name": str(c.get("name", ""))} for c in base.categories]},
                 ctx=ctx, prepare_batch=step, evaluate_fn=evaluate_fn)


def eval_online(checkpoint: str | Path, *, coco: str | Path, split: str = "val2017", detector: str | None = None,
                detector_checkpoint: str | Path | None = None, out: str | Path | None = None, batch_size: int = 2,
                device: str = "auto", max_images: int = 0, evaluator: str = "pycocotools",
                category_ap: dict[int, dict[str, Any]] | None = None, slot_categories: str | Path | None = None
                ) -> dict[str, dict[str, float]]:
    """``mfdetr eval --online``: a run's MaskNet (and fine-tuned detector tensors) on a COCO split, with
    the detector in the loop. Detector name and checkpoint default to what an online run recorded."""
    from mfdetr.config import from_dict
    from mfdetr.data import CocoInstances
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.devices import resolve_device
    from mfdetr.engine.checkpoint import load_checkpoint, load_weights
    from mfdetr.engine.config import build_run_config
    from mfdetr.engine.finetune import load_finetuned_detector, split_state
    from mfdetr.engine.stage2 import build_parts, evaluate_masknet
    from mfdetr.errors import MfdetrError
    from mfdetr.masknet import MaskNetConfig

    ckpt = load_checkpoint(checkpoint)
    rec = dict(ckpt.get("meta", {}).get("online") or {})
    detector = detector or rec.get("detector")
    if detector is None:
        raise MfdetrError("a cached run does not record its detector: pass --detector NAME --detector-checkpoint "
                          "FILE", path=checkpoint)
    if detector_checkpoint is None and rec.get("checkpoint") not in (None, "None"):
        detector_checkpoint = rec["checkpoint"]
    cfg = build_run_config(ckpt["config"], where=str(checkpoint))
    mcfg = from_dict(MaskNetConfig, dict(ckpt["masknet_config"]), where=f"{checkpoint}: masknet_config")
    topk = int(rec.get("topk", mcfg.num_queries))
    dev = resolve_device(device)
    if detector.startswith("auto-"):  # an architecture read from the checkpoint: rebuild it from there
        from mfdetr.detectors.resolve import resolve_detector

        detector = resolve_detector(detector, detector_checkpoint, slot_categories=slot_categories,
                                    categories_file=Path(coco) / "annotations" / f"instances_{split}.json").name
    preset = get_preset(detector)
    det_model = build_detector(detector, checkpoint=detector_checkpoint, device=str(dev))
    masknet_sd, detector_sd = split_state(ckpt["model"])
    if detector_sd:
        load_finetuned_detector(det_model, detector_sd)
    manifest = detector_manifest(preset, topk)
    parts = build_parts(cfg, manifest)
    load_weights(parts.model, masknet_sd, path=checkpoint)
    val = OnlineEvalSet(CocoInstances(coco, split, preprocessing=preset.preprocessing, with_targets=True),
                        _detector_step(cfg, det_model, topk, mcfg.enc_layer, dev, grad=False), dev,
                        max_images=max_images, coarsest_stride=max(preset.level_strides))
    metrics, results = evaluate_masknet(parts.model, val, manifest=manifest, batch_size=batch_size, device=dev,
                                        evaluator=evaluator, category_ap=category_ap)
    if out is not None:
        from mfdetr.evaluation import write_results_json

        write_results_json(out, results)
    return metrics


class _Subset(torch.utils.data.Subset):  # type: ignore[type-arg]
    """The first ``n`` items, forwarding ``set_epoch`` (per-epoch augmentation draws)."""

    def __init__(self, dataset: Any, n: int) -> None:
        super().__init__(dataset, range(n))

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)


def sweep_online(spec: SweepSpec, *, detector: str, checkpoint: str | None, coco: str, split: str = "train2017",
                 val_split: str = "val2017", out_dir: str | Path, topk: int = 100, overrides: Sequence[str] = (),
                 only: Sequence[str] = (), log: Callable[[str], None] = print) -> list[VariantResult]:
    """``mfdetr sweep --online``: every variant trained online (Tables 11 and 13: fine-tuning, LSJ) and
    evaluated through the detector on ``val_split``; the same comparison tables as a cached sweep."""
    import json

    from mfdetr.detectors import get_preset
    from mfdetr.engine.stage2 import build_parts, complexity
    from mfdetr.engine.sweep import VariantResult, run_sweep
    from mfdetr.errors import MfdetrError

    if not spec.sweep.train:
        raise MfdetrError("an online sweep trains every variant: use a cache for training-free sweeps "
                          "(`mfdetr sweep --cache ... --val-cache ...`)", path=spec.path)
    manifest = detector_manifest(get_preset(detector), topk)

    def run_variant(v: Any, cfg: Any, vdir: Path) -> Any:
        run = vdir / "run"
        train_online(cfg, detector=detector, checkpoint=checkpoint, coco=coco, split=split, out=str(run), topk=topk,
                     resume=(run / "ckpt.pt").is_file(), val_split=val_split)
        metrics = json.loads((run / "val_metrics.json").read_text())
        cx = complexity(build_parts(cfg, manifest).model, manifest)
        return VariantResult(name=v.name, labels=list(v.labels), params_m=cx["params_m"], flops_g=cx["flops_g"],
                             metrics={**metrics["segm"], "boundary_AP": metrics.get("boundary", {}).get("AP")})

    sources = {**online_source(detector=detector, checkpoint=checkpoint, split=split, topk=topk, annotation_sha256=""),
               "val_split": val_split}
    return run_sweep(spec, out_dir=out_dir, run_variant=run_variant, overrides=overrides, only=only, log=log,
                     sources=sources)
