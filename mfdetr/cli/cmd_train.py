"""``mfdetr train``: stage 2 — train the mask network on a feature cache, or online (also under torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train", context_settings={"allow_interspersed_args": True})
    def train(
        cache: str = typer.Option(None, "--cache", help="Training cache store (written by `mfdetr cache`)."),
        coco: Path = typer.Option(None, "--coco", help="COCO folder the caches were written from (GT annotations; "
                                                       "default: the folder `mfdetr cache` recorded, if it still exists)."),
        val_cache: str = typer.Option(None, "--val-cache", help="Validation cache: evaluated at the end "
                                                                 "(and every train.eval_every steps)."),
        config: Path = typer.Option(None, "--config", help="Run recipe TOML, e.g. pipeline/recipes/hdetr_r50.toml "
                                                           "(default: the paper's final system)."),
        out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder (config, metrics, TensorBoard, checkpoints)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
        require_complete: bool = typer.Option(False, "--require-complete",
                                              help="Refuse a cache that is still being written."),
        skip_damaged: bool = typer.Option(False, "--skip-damaged",
                                          help="Skip damaged cache images (missing/corrupt chunks, non-finite values) "
                                               "and list them in OUT/damaged_images.json, instead of stopping."),
        annotations: Path = typer.Option(None, "--annotations", help="Override the training annotation file."),
        val_annotations: Path = typer.Option(None, "--val-annotations", help="Override the validation annotation file."),
        online: bool = typer.Option(False, "--online", help="Run the frozen detector in the loop instead of a cache."),
        detector: str = typer.Option(None, "--detector", help="--online: detector preset name or file, or 'auto'."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="--online: detector checkpoint file (default: "
                                                                   "the preset's shipped weights)."),
        detector_config: Path = typer.Option(None, "--detector-config",
                                             help="With --detector auto: the official config the detector was "
                                                  "trained with (DINO .py, H-DETR .sh; read as data)."),
        categories: Path = typer.Option(None, "--categories",
                                        help="--online with --detector auto: the category of each class slot, in "
                                             "order (JSON list of {id, name} or a COCO annotation file)."),
        split: str = typer.Option("train2017", "--split", help="--online: COCO split to train on."),
        topk: int = typer.Option(100, "--topk", help="--online: queries kept per image (the cache's K)."),
        val_split: str = typer.Option(None, "--val-split", help="--online: COCO split to evaluate on (e.g. val2017)."),
        remote_cache_dir: str = typer.Option(None, "--remote-cache-dir", help="Node-local read-through copy of caches on object storage (s3://...): each object fetched once per node (default: $MFDETR_REMOTE_CACHE_DIR, else ~/.cache/mfdetr/remote; 'off' disables)."),
        overrides: list[str] = typer.Argument(None, help="Config overrides section.key=value, e.g. train.batch_size=2."),
    ) -> None:
        """Train MaskNet on cached detector outputs (AdamW, step lr, AMP on GPU); evaluate on --val-cache."""
        from mfdetr.cache.readthrough import use_cache_root

        use_cache_root(remote_cache_dir)
        from mfdetr.engine.config import build_run_config, load_run_config
        from mfdetr.errors import MfdetrError
        from mfdetr.outputs import check_output_dir

        check_output_dir(out)

        ovr = list(overrides or []) + (["data.require_complete=true"] if require_complete else [])
        recorded = out / "config.json"
        if resume and config is None and recorded.is_file():
            cfg = build_run_config(json.loads(recorded.read_text()), ovr, where=str(recorded))
        else:
            cfg = load_run_config(config, ovr)
        if online:
            if detector is None or coco is None:
                raise MfdetrError("--online needs --detector NAME and --coco DIR (and usually --checkpoint FILE)")
            if cache is not None:
                raise MfdetrError("--online trains without a cache: drop --cache")
            from mfdetr.detectors.resolve import resolve_detector
            from mfdetr.engine.online import train_online

            det = resolve_detector(detector, checkpoint, config_file=detector_config, echo=typer.echo,
                                   categories_file=annotations or coco / "annotations" / f"instances_{split}.json",
                                   slot_categories=categories)
            ckpt = str(det.checkpoint) if det.checkpoint else None
            train_online(cfg, detector=det.name, checkpoint=ckpt, coco=str(coco),
                         split=split, out=str(out), topk=topk, resume=resume, val_split=val_split)
            return
        if cache is None:
            raise MfdetrError("pass --cache DIR (or --online --detector NAME --checkpoint FILE --coco DIR)")
        if val_split is not None:
            raise MfdetrError("--val-split is for --online; a cached run evaluates on --val-cache DIR")
        from mfdetr.engine.damage import DamagePolicy
        from mfdetr.engine.stage2 import CacheSources, train_from_cache

        src = CacheSources(cache=cache, coco=coco, val_cache=val_cache, annotations=annotations,
                           val_annotations=val_annotations)
        train_from_cache(cfg, src, out, resume=resume, damage=DamagePolicy(skip=skip_damaged))
