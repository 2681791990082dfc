"""Stage 2 wiring: the run's parts (:mod:`mfdetr.engine.parts`), COCO evaluation, and the entry points of
``mfdetr train`` / ``mfdetr eval`` / ``mfdetr sweep``.

Composition only: the cache reader, the COCO data/evaluation and the
mask network are built here and handed to the training loop (:mod:`mfdetr.engine.trainer`).
``mfdetr.detectors`` is never imported — stage 2 sees only cached tensors.

Evaluation (segm, Boundary and box AP over the same images) is :mod:`mfdetr.engine.evaluate`'s.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mfdetr.cache.verify import find_damaged
from mfdetr.engine.cache_data import CacheDataset, detector_identity, manifest_sha256, open_annotations, open_cache
from mfdetr.engine.cache_views import ViewSampledDataset
from mfdetr.engine.checkpoint import (
    atomic_write_text,
    check_masknet_config,
    check_resume_source,
    load_checkpoint,
    load_weights,
)
from mfdetr.engine.damage import DamagePolicy

# the run's parts, re-exported: stage 2's entry points and their users import them from here
from mfdetr.engine.parts import FLOPS_INPUT_HW as FLOPS_INPUT_HW
from mfdetr.engine.parts import Stage2Parts as Stage2Parts
from mfdetr.engine.parts import build_parts as build_parts
from mfdetr.engine.parts import complexity as complexity
from mfdetr.engine.parts import resolve_masknet_config as resolve_masknet_config
from mfdetr.engine.parts import training_model as training_model
from mfdetr.engine.parts import with_cache_enc_layer as with_cache_enc_layer
from mfdetr.engine.evaluate import evaluate_and_record, evaluate_masknet, flat_metrics, format_metrics
from mfdetr.engine.config import RunConfig, build_run_config, load_run_config
from mfdetr.devices import resolve_device
from mfdetr.engine.sweep import SweepSpec, Variant, VariantResult, run_sweep
from mfdetr.engine.trainer import TrainResult, train
from mfdetr.errors import MfdetrError

# ---- entry points ----------------------------------------------------------------------------------


@dataclass
class CacheSources:
    """Where the data of a stage-2 run comes from."""

    cache: Path
    coco: Path | None
    val_cache: Path | None = None
    annotations: Path | None = None
    val_annotations: Path | None = None


def _datasets(
    cfg: RunConfig, src: CacheSources, enc_layer: int, damage: DamagePolicy
) -> tuple[Any, CacheDataset, CacheDataset | None]:
    store = open_cache(src.cache, enc_layer=enc_layer, role="training cache")
    train_kw: dict[str, Any] = {
        "store": store,
        "coco_split": open_annotations(store, coco=src.coco, annotations=src.annotations),
        "enc_layer": enc_layer,
        "require_complete": cfg.data.require_complete,
        "max_images": cfg.data.max_images,
        "on_damaged": "substitute",
        "memory_bytes": (cfg.data.memory_cache_mb << 20) // max(1, cfg.train.num_workers),
    }
    # a cache with several views: one view per image and epoch, seeded by the run seed
    train_set = (
        ViewSampledDataset(views=store.views, seed=cfg.train.seed, **train_kw)
        if len(store.views) > 1
        else CacheDataset(**train_kw)
    )
    damage.take(train_set.damaged_commits)
    val_set = None
    if src.val_cache is not None:
        vstore = open_cache(
            src.val_cache, identity=detector_identity(store.manifest), enc_layer=enc_layer, role="validation cache"
        )
        val_set = CacheDataset(
            store=vstore,
            coco_split=open_annotations(vstore, coco=src.coco, annotations=src.val_annotations),
            enc_layer=enc_layer,
            max_images=cfg.data.max_images,
            on_damaged="mark",
        )
        damage.take(val_set.damaged_commits)
        # lost or emptied chunk files of the validation cache: found now, not after the training
        damage.take(find_damaged(vstore, full=False, indices=val_set.indices))
    return store, train_set, val_set


def train_from_cache(
    cfg: RunConfig,
    src: CacheSources,
    out: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    damage: DamagePolicy | None = None,
) -> tuple[TrainResult | None, dict[str, Any]]:
    """``mfdetr train --cache``: train MaskNet on a cache, evaluate on ``val_cache`` at the end
    (and every ``train.eval_every`` steps); write the run folder. Returns (result, final metrics).

    A damaged cache image stops the run with a one-line error, unless ``damage`` skips it: training
    then takes the next intact image in its place, and the skipped images are listed in
    ``out/damaged_images.json`` (and in ``val_metrics.json`` for the validation cache)."""
    log = log or (lambda s: print(f"mfdetr: {s}", file=sys.stderr))
    damage = damage or DamagePolicy()
    refuse_online_settings(cfg)
    cfg = with_cache_enc_layer(cfg, src.cache)
    mcfg = resolve_masknet_config(cfg)
    store, train_set, val_set = _datasets(cfg, src, mcfg.enc_layer, damage)
    parts = build_parts(cfg, store.manifest)
    # one FLOP-counting forward at the typical input size: only the rank that writes the record
    cx = complexity(parts.model, store.manifest) if os.environ.get("RANK", "0") == "0" else {}
    metrics: dict[str, Any] = {}

    def evaluate_fn(model: nn.Module, step: int) -> dict[str, float]:
        assert val_set is not None
        m = evaluate_and_record(
            model,
            val_set,
            manifest=store.manifest,
            cfg=cfg,
            out=Path(out),
            step=step,
            device=next(model.parameters()).device,
            damage=damage,
        )
        metrics.clear()
        metrics.update(m)
        return flat_metrics(m)

    record = {
        "train_cache": str(src.cache),
        "val_cache": str(src.val_cache) if src.val_cache else None,
        "detector": detector_identity(store.manifest),
        "complexity": cx,
        "categories": [{"id": int(c["id"]), "name": str(c.get("name", ""))} for c in train_set.coco.categories],
        "train_images_missing": train_set.num_pending + train_set.num_skipped,
        "cache_manifest": store.manifest,
    }
    if resume:
        check_same_cache(out, store.manifest)
    res = train(
        cfg=cfg,
        model=training_model(parts),
        train_set=train_set,
        run_dir=out,
        resume=resume,
        masknet_config=_plain(parts.masknet_cfg),
        manifest_sha256=manifest_sha256(store.manifest),
        evaluate_fn=evaluate_fn if val_set is not None else None,
        record=record,
        prepare_batch=damage.preparer(train_set.prepare_batch),
    )
    if damage.skipped and os.environ.get("RANK", "0") == "0":
        damage.write(Path(out) / "damaged_images.json")
        log(f"skipped {len(damage.skipped)} damaged cache image(s) (listed in {Path(out) / 'damaged_images.json'})")
    if metrics:
        log("validation:\n" + format_metrics(metrics))
    return res, metrics


def check_same_cache(run_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """``--resume`` only with the training cache the run started on (manifest recorded and compared)."""
    check_resume_source(
        run_dir,
        key="cache_manifest",
        current=manifest,
        what="training cache",
        legacy_hash=("manifest_sha256", manifest_sha256(manifest)),
    )


def refuse_online_settings(cfg: RunConfig) -> None:
    """A cached run reads fixed features: ``[online]`` settings (jitter, fine-tuning) cannot apply."""
    if not cfg.online.is_default:
        from mfdetr.config import to_dict

        changed = sorted(k for k, v in to_dict(cfg.online).items() if v != to_dict(type(cfg.online)())[k])
        raise MfdetrError(
            f"[online] settings ({', '.join(f'online.{k}' for k in changed)}) need `mfdetr train "
            "--online --detector NAME --checkpoint FILE --coco DIR`: a cache holds fixed features"
        )


def _plain(cfg: Any) -> dict[str, Any]:
    from mfdetr.config import to_dict

    return to_dict(cfg)


def masknet_on_cache(
    src: CacheSources,
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    damage: DamagePolicy | None = None,
) -> tuple[nn.Module, CacheDataset, Any]:
    """``(model, dataset, store)``: a checkpoint's MaskNet (or a training-free config's) and the evaluation
    dataset of the cache it fits (another detector's cache, a fine-tuned run, another config: refused)."""
    damage = damage or DamagePolicy()
    ckpt = None
    if checkpoint is not None:
        if config is not None:
            raise MfdetrError("pass either --checkpoint (its recorded config is used) or --config, not both")
        ckpt = load_checkpoint(checkpoint)
        cfg = build_run_config(ckpt["config"], overrides, where=str(checkpoint))
    else:
        cfg = load_run_config(config, overrides)
    mcfg = resolve_masknet_config(cfg)
    identity = ckpt.get("meta", {}).get("detector") if ckpt is not None else None
    store = open_cache(src.cache, identity=identity, enc_layer=mcfg.enc_layer, role="evaluation cache")
    ds = CacheDataset(
        store=store,
        coco_split=open_annotations(store, coco=src.coco, annotations=src.annotations),
        enc_layer=mcfg.enc_layer,
        max_images=cfg.data.max_images,
        on_damaged="mark",
    )
    damage.take(ds.damaged_commits)
    parts = build_parts(cfg, store.manifest)
    if ckpt is not None:
        from mfdetr.engine.finetune import is_finetuned_state

        if is_finetuned_state(ckpt["model"]):
            raise MfdetrError(
                "this run fine-tuned the detector (online.finetune), so a cache of the original "
                "detector's features does not fit it: evaluate with `mfdetr eval --online --coco DIR "
                "--split SPLIT --checkpoint CKPT`",
                path=checkpoint,
            )
        check_masknet_config(ckpt, _plain(parts.masknet_cfg), checkpoint)  # type: ignore[arg-type]
        load_weights(parts.model, ckpt["model"], path=checkpoint)
    elif any(p.requires_grad for p in parts.model.parameters()):
        raise MfdetrError(
            "this MaskNet config has trainable parts: pass --checkpoint (only training-free "
            "configs, paper Table 1, evaluate without one)"
        )
    return parts.model, ds, store


def eval_from_cache(
    src: CacheSources,
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    batch_size: int = 2,
    device: str = "auto",
    damage: DamagePolicy | None = None,
    evaluator: str = "pycocotools",
    category_ap: dict[int, dict[str, Any]] | None = None,
) -> dict[str, dict[str, float]]:
    """``mfdetr eval``: a trained checkpoint (or a training-free config, Table 1) on a cache
    (``category_ap``: filled per category, see :func:`evaluate_masknet`).

    A damaged cache image stops it, unless ``damage`` skips it (AP over the intact images)."""
    damage = damage or DamagePolicy()
    model, ds, store = masknet_on_cache(src, checkpoint=checkpoint, config=config, overrides=overrides, damage=damage)
    dev = resolve_device(device)
    metrics, results = evaluate_masknet(
        model,
        ds,
        manifest=store.manifest,
        batch_size=batch_size,
        device=dev,
        damage=damage,
        evaluator=evaluator,
        category_ap=category_ap,
    )
    if out is not None:
        from mfdetr.evaluation import write_results_json

        write_results_json(out, results)
    return metrics


def sweep_from_cache(
    spec: SweepSpec,
    src: CacheSources,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[VariantResult]:
    """``mfdetr sweep``: every variant of a sweep file trained (unless training-free) and evaluated from
    the same caches; comparison tables in ``out_dir``."""
    if src.val_cache is None:
        raise MfdetrError("a sweep needs --val-cache (every variant is evaluated)")

    def run_variant(v: Variant, cfg: RunConfig, vdir: Path) -> VariantResult:
        refuse_online_settings(cfg)
        mcfg = resolve_masknet_config(cfg)
        store, train_set, val_set = _datasets(cfg, src, mcfg.enc_layer, DamagePolicy())
        assert val_set is not None
        parts = build_parts(cfg, store.manifest)
        cx = complexity(parts.model, store.manifest)
        trainable = any(p.requires_grad for p in parts.model.parameters())
        if spec.sweep.train and trainable:
            resume = (vdir / "run" / "ckpt.pt").exists()
            if resume:
                check_same_cache(vdir / "run", store.manifest)
            train(
                cfg=cfg,
                model=training_model(parts),
                train_set=train_set,
                run_dir=vdir / "run",
                resume=resume,
                masknet_config=_plain(parts.masknet_cfg),
                manifest_sha256=manifest_sha256(store.manifest),
                record={"variant": v.name, "complexity": cx, "cache_manifest": store.manifest},
                prepare_batch=train_set.prepare_batch,
            )
        dev = resolve_device(cfg.train.device)
        m, _ = evaluate_masknet(
            parts.model,
            val_set,
            manifest=store.manifest,
            batch_size=cfg.train.batch_size,
            device=dev,
            amp=cfg.train.amp,
        )
        atomic_write_text(vdir / "metrics.json", json.dumps(m, indent=2) + "\n")
        return VariantResult(
            name=v.name,
            labels=list(v.labels),
            params_m=cx["params_m"],
            flops_g=cx["flops_g"],
            metrics={**m["segm"], "boundary_AP": m["boundary"]["AP"]},
        )

    sources = {
        "train_cache": manifest_sha256(open_cache(src.cache, role="training cache").manifest),
        "val_cache": manifest_sha256(open_cache(src.val_cache, role="validation cache").manifest),
    }
    return run_sweep(
        spec, out_dir=out_dir, run_variant=run_variant, overrides=overrides, only=only, log=log, sources=sources
    )
