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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# the detector step, re-exported: the online mode's public names stay importable from here
from mfdetr.engine.online_step import DetectorStep as DetectorStep
from mfdetr.engine.online_step import ImageStep as ImageStep
from mfdetr.engine.online_step import OnlineEvalSet as OnlineEvalSet
from mfdetr.engine.online_step import _detector_step
from mfdetr.engine.online_step import detector_manifest as detector_manifest
from mfdetr.engine.online_step import online_source as online_source
from mfdetr.engine.online_step import round_features as round_features
from mfdetr.engine.online_step import zero_padding as zero_padding
from mfdetr.engine.screening import runnable_indices

if TYPE_CHECKING:
    from mfdetr.engine.config import RunConfig
    from mfdetr.engine.sweep import SweepSpec, VariantResult
    from mfdetr.engine.trainer import TrainResult


def train_online(
    cfg: RunConfig,
    *,
    detector: str,
    checkpoint: str | None,
    coco: str,
    split: str = "train2017",
    out: str,
    topk: int = 100,
    resume: bool = False,
    val_split: str | None = None,
) -> TrainResult:
    """``mfdetr train --online``: the same training with the detector run in the loop (``cfg.online``:
    large-scale jitter, fine-tuning, rounding through the cache dtype); evaluated on ``val_split``
    (through the detector as it is at that step) at the end and every ``train.eval_every`` steps."""
    from functools import partial

    from mfdetr.config import to_dict
    from mfdetr.data import CocoInstances, collate
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.contracts import default_enc_layer
    from mfdetr.engine.config import with_default_enc_layer
    from mfdetr.engine.distributed import init_distributed
    from mfdetr.engine.parts import build_parts, resolve_masknet_config
    from mfdetr.engine.trainer import train

    oc = cfg.online
    ctx = init_distributed(cfg.train.device)
    preset = get_preset(detector)
    cfg = with_default_enc_layer(cfg, default_enc_layer(preset.num_encoder_layers))
    det_model = build_detector(detector, checkpoint=checkpoint, device=str(ctx.device))
    mcfg = resolve_masknet_config(cfg)
    base = CocoInstances(coco, split, preprocessing=preset.preprocessing, with_targets=True)
    run = _OnlineDetector(cfg, det_model, topk, mcfg.enc_layer, ctx.device, coarsest=max(preset.level_strides))
    dataset = _online_train_set(cfg, base, run)
    manifest = detector_manifest(preset, topk)
    parts = build_parts(cfg, manifest)
    step = run.step(grad=oc.finetune != "none")
    model = _training_model(parts, run, step)
    evaluate_fn = None
    if val_split:
        val = CocoInstances(coco, val_split, preprocessing=preset.preprocessing, with_targets=True)
        evaluate_fn = _evaluate_fn(run, parts.model, val, manifest, out)
    source = online_source(
        detector=detector, checkpoint=checkpoint, split=split, topk=topk, annotation_sha256=base.annotation_sha256
    )
    if resume:
        from mfdetr.engine.checkpoint import check_resume_source

        check_resume_source(out, key="online_source", current=source, what="detector or training data")
    online = {
        "detector": detector,
        "checkpoint": str(checkpoint),
        "coco": str(coco),
        "split": split,
        "val_split": val_split,
        "topk": topk,
        "lsj": oc.lsj,
        "finetune": oc.finetune,
    }
    record = {"online": online, "online_source": source, **_detector_record(preset, base)}
    return train(
        cfg=cfg,
        model=model,
        train_set=dataset,
        run_dir=out,
        collate=partial(collate),
        resume=resume,
        masknet_config=to_dict(parts.masknet_cfg),
        record=record,
        ctx=ctx,
        prepare_batch=step,
        evaluate_fn=evaluate_fn,
    )


@dataclass(frozen=True)
class _OnlineDetector:
    """The frozen detector of an online run and how its steps are made."""

    cfg: RunConfig
    model: Any
    topk: int
    enc_layer: int
    device: torch.device
    coarsest: int  # the detector's coarsest feature stride

    def step(self, *, grad: bool) -> DetectorStep:
        return _detector_step(self.cfg, self.model, self.topk, self.enc_layer, self.device, grad=grad)


def _training_model(parts: Any, run: _OnlineDetector, step: DetectorStep) -> Any:
    """What an online run trains: MaskNet on the positives, with the detector when ``online.finetune``
    fine-tunes it by MaskNet's losses (``step`` then runs it with gradients)."""
    from mfdetr.engine.finetune import FineTuned
    from mfdetr.engine.parts import training_model
    from mfdetr.engine.training.models import FineTunedModel

    model: Any = training_model(parts)  # MaskNet on the positives only
    oc = run.cfg.online
    if oc.finetune != "none":
        model = FineTunedModel(
            FineTuned(
                model.network, run.model, mode=oc.finetune, detector_step=step, detector_lr_mult=oc.detector_lr_mult
            ),
            parts.criterion,
            assigns_targets=True,
        )
    return model


def _evaluate_fn(
    run: _OnlineDetector, model: torch.nn.Module, coco_val: Any, manifest: dict[str, Any], out: str
) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """The trainer's ``evaluate_fn`` of an online run: MaskNet on the validation split through the
    detector as it is at that step, recorded in the run folder."""
    from mfdetr.engine.stage2 import evaluate_and_record, flat_metrics

    cfg = run.cfg
    val = OnlineEvalSet(
        coco_val, run.step(grad=False), run.device, max_images=cfg.data.max_images, coarsest_stride=run.coarsest
    )

    def evaluate_fn(m: torch.nn.Module, at: int) -> dict[str, float]:
        r = evaluate_and_record(model, val, manifest=manifest, cfg=cfg, out=Path(out), step=at, device=val.device)
        return flat_metrics(r)

    return evaluate_fn


def _online_train_set(cfg: RunConfig, base: Any, run: _OnlineDetector) -> Any:
    """The training images of an online run: the split with large-scale jitter, or the images the detector
    can process; an unreadable image replaced by the next one; at most ``data.max_images``."""
    from mfdetr.data import LargeScaleJitter, SkipReplace

    oc = cfg.online
    dataset: Any = base
    if oc.lsj:  # random windows: an image the detector cannot process is left out of its step instead
        dataset = LargeScaleJitter(
            base, size=oc.lsj_size, min_scale=oc.lsj_min_scale, max_scale=oc.lsj_max_scale, seed=cfg.train.seed
        )
    else:
        kept = runnable_indices(base, run.step(grad=False)._detect, run.device, range(len(base)), run.coarsest)
        if len(kept) < len(base):
            dataset = torch.utils.data.Subset(base, kept)
    dataset = SkipReplace(dataset)  # an unreadable image: the next one takes its place (reported)
    if cfg.data.max_images > 0:
        dataset = _Subset(dataset, min(cfg.data.max_images, len(dataset)))
    return dataset


def _detector_record(preset: Any, base: Any) -> dict[str, Any]:
    """The detector and categories an online run records (what ``eval`` and ``predict`` read back)."""
    return {
        "detector": {
            "detector.name": preset.name,
            "num_classes": preset.num_classes,
            "category_map": list(preset.class_to_category),
        },
        "categories": [{"id": int(c["id"]), "name": str(c.get("name", ""))} for c in base.categories],
    }


def eval_online(
    checkpoint: str | Path,
    *,
    coco: str | Path,
    split: str = "val2017",
    detector: str | None = None,
    detector_checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 2,
    device: str = "auto",
    max_images: int = 0,
    evaluator: str = "pycocotools",
    category_ap: dict[int, dict[str, Any]] | None = None,
    slot_categories: str | Path | None = None,
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
        raise MfdetrError(
            "a cached run does not record its detector: pass --detector NAME --detector-checkpoint FILE",
            path=checkpoint,
        )
    if detector_checkpoint is None and rec.get("checkpoint") not in (None, "None"):
        detector_checkpoint = rec["checkpoint"]
    cfg = build_run_config(ckpt["config"], where=str(checkpoint))
    mcfg = from_dict(MaskNetConfig, dict(ckpt["masknet_config"]), where=f"{checkpoint}: masknet_config")
    topk = int(rec.get("topk", mcfg.num_queries))
    dev = resolve_device(device)
    if detector.startswith("auto-"):  # an architecture read from the checkpoint: rebuild it from there
        from mfdetr.detectors.resolve import resolve_detector

        detector = resolve_detector(
            detector,
            detector_checkpoint,
            slot_categories=slot_categories,
            categories_file=Path(coco) / "annotations" / f"instances_{split}.json",
        ).name
    preset = get_preset(detector)
    det_model = build_detector(detector, checkpoint=detector_checkpoint, device=str(dev))
    masknet_sd, detector_sd = split_state(ckpt["model"])
    if detector_sd:
        load_finetuned_detector(det_model, detector_sd)
    manifest = detector_manifest(preset, topk)
    parts = build_parts(cfg, manifest)
    load_weights(parts.model, masknet_sd, path=checkpoint)
    val = OnlineEvalSet(
        CocoInstances(coco, split, preprocessing=preset.preprocessing, with_targets=True),
        _detector_step(cfg, det_model, topk, mcfg.enc_layer, dev, grad=False),
        dev,
        max_images=max_images,
        coarsest_stride=max(preset.level_strides),
    )
    metrics, results = evaluate_masknet(
        parts.model,
        val,
        manifest=manifest,
        batch_size=batch_size,
        device=dev,
        evaluator=evaluator,
        category_ap=category_ap,
    )
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


def sweep_online(
    spec: SweepSpec,
    *,
    detector: str,
    checkpoint: str | None,
    coco: str,
    split: str = "train2017",
    val_split: str = "val2017",
    out_dir: str | Path,
    topk: int = 100,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[VariantResult]:
    """``mfdetr sweep --online``: every variant trained online (Tables 11 and 13: fine-tuning, LSJ) and
    evaluated through the detector on ``val_split``; the same comparison tables as a cached sweep."""
    import json

    from mfdetr.detectors import get_preset
    from mfdetr.engine.parts import build_parts, complexity
    from mfdetr.engine.sweep import VariantResult, run_sweep
    from mfdetr.errors import MfdetrError

    if not spec.sweep.train:
        raise MfdetrError(
            "an online sweep trains every variant: use a cache for training-free sweeps "
            "(`mfdetr sweep --cache ... --val-cache ...`)",
            path=spec.path,
        )
    manifest = detector_manifest(get_preset(detector), topk)

    def run_variant(v: Any, cfg: Any, vdir: Path) -> Any:
        run = vdir / "run"
        train_online(
            cfg,
            detector=detector,
            checkpoint=checkpoint,
            coco=coco,
            split=split,
            out=str(run),
            topk=topk,
            resume=(run / "ckpt.pt").is_file(),
            val_split=val_split,
        )
        metrics = json.loads((run / "val_metrics.json").read_text())
        cx = complexity(build_parts(cfg, manifest).model, manifest)
        return VariantResult(
            name=v.name,
            labels=list(v.labels),
            params_m=cx["params_m"],
            flops_g=cx["flops_g"],
            metrics={**metrics["segm"], "boundary_AP": metrics.get("boundary", {}).get("AP")},
        )

    sources = {
        **online_source(detector=detector, checkpoint=checkpoint, split=split, topk=topk, annotation_sha256=""),
        "val_split": val_split,
    }
    return run_sweep(
        spec, out_dir=out_dir, run_variant=run_variant, overrides=overrides, only=only, log=log, sources=sources
    )
