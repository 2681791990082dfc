"""``mfdetr train``: stage 2 — train the mask network on a feature cache, or online (also under torchrun)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mfdetr.cli.options import DetectorConfig, OnlineSlotCategories, RemoteCacheDir

if TYPE_CHECKING:
    from mfdetr.engine.config import RunConfig

Cache = Annotated[str | None, typer.Option("--cache", help="Training cache store (written by `mfdetr cache`).")]
Coco = Annotated[
    Path | None,
    typer.Option(
        "--coco",
        help="COCO folder the caches were written from (GT annotations; default: the folder `mfdetr cache` "
        "recorded, if it still exists).",
    ),
]
ValCache = Annotated[
    str | None,
    typer.Option("--val-cache", help="Validation cache: evaluated at the end (and every train.eval_every steps)."),
]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Run recipe TOML, e.g. pipeline/recipes/hdetr_r50.toml (default: the paper's final system)."
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Run folder (config, metrics, TensorBoard, checkpoints).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")]
RequireComplete = Annotated[
    bool, typer.Option("--require-complete", help="Refuse a cache that is still being written.")
]
SkipDamaged = Annotated[
    bool,
    typer.Option(
        "--skip-damaged",
        help="Skip damaged cache images (missing/corrupt chunks, non-finite values) and list them in "
        "OUT/damaged_images.json, instead of stopping.",
    ),
]
Annotations = Annotated[Path | None, typer.Option("--annotations", help="Override the training annotation file.")]
ValAnnotations = Annotated[
    Path | None, typer.Option("--val-annotations", help="Override the validation annotation file.")
]
Online = Annotated[bool, typer.Option("--online", help="Run the frozen detector in the loop instead of a cache.")]
Detector = Annotated[str | None, typer.Option("--detector", help="--online: detector preset name or file, or 'auto'.")]
Checkpoint = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="--online: detector checkpoint file (default: the preset's shipped weights)."),
]
Split = Annotated[str, typer.Option("--split", help="--online: COCO split to train on.")]
TopK = Annotated[int, typer.Option("--topk", help="--online: queries kept per image (the cache's K).")]
ValSplit = Annotated[
    str | None, typer.Option("--val-split", help="--online: COCO split to evaluate on (e.g. val2017).")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Config overrides section.key=value, e.g. train.batch_size=2.")
]


def register(app: typer.Typer) -> None:
    app.command("train", context_settings={"allow_interspersed_args": True})(train)


def train(
    cache: Cache = None,
    coco: Coco = None,
    val_cache: ValCache = None,
    config: Config = None,
    out: Out = Path("runs/train"),
    resume: Resume = False,
    require_complete: RequireComplete = False,
    skip_damaged: SkipDamaged = False,
    annotations: Annotations = None,
    val_annotations: ValAnnotations = None,
    online: Online = False,
    detector: Detector = None,
    checkpoint: Checkpoint = None,
    detector_config: DetectorConfig = None,
    categories: OnlineSlotCategories = None,
    split: Split = "train2017",
    topk: TopK = 100,
    val_split: ValSplit = None,
    remote_cache_dir: RemoteCacheDir = None,
    overrides: Overrides = None,
) -> None:
    """Train MaskNet on cached detector outputs (AdamW, step lr, AMP on GPU); evaluate on --val-cache."""
    from mfdetr.cache.readthrough import use_cache_root

    use_cache_root(remote_cache_dir)
    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import check_output_dir

    check_output_dir(out)
    ovr = list(overrides or []) + (["data.require_complete=true"] if require_complete else [])
    cfg = _run_config(config, out, resume, ovr)
    if online:
        if detector is None or coco is None:
            raise MfdetrError("--online needs --detector NAME and --coco DIR (and usually --checkpoint FILE)")
        if cache is not None:
            raise MfdetrError("--online trains without a cache: drop --cache")
        from mfdetr.detectors.resolve import resolve_detector
        from mfdetr.engine.online import train_online

        det = resolve_detector(
            detector,
            checkpoint,
            config_file=detector_config,
            echo=typer.echo,
            categories_file=annotations or coco / "annotations" / f"instances_{split}.json",
            slot_categories=categories,
        )
        ckpt = str(det.checkpoint) if det.checkpoint else None
        train_online(
            cfg,
            detector=det.name,
            checkpoint=ckpt,
            coco=str(coco),
            split=split,
            out=str(out),
            topk=topk,
            resume=resume,
            val_split=val_split,
        )
        return
    if cache is None:
        raise MfdetrError("pass --cache DIR (or --online --detector NAME --checkpoint FILE --coco DIR)")
    if val_split is not None:
        raise MfdetrError("--val-split is for --online; a cached run evaluates on --val-cache DIR")
    from mfdetr.engine.damage import DamagePolicy
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    src = CacheSources(
        cache=cache, coco=coco, val_cache=val_cache, annotations=annotations, val_annotations=val_annotations
    )
    train_from_cache(cfg, src, out, resume=resume, damage=DamagePolicy(skip=skip_damaged))


def _run_config(config: Path | None, out: Path, resume: bool, overrides: list[str]) -> RunConfig:
    """The run's config: on --resume without --config the one the run recorded, else the recipe with overrides."""
    from mfdetr.engine.config import build_run_config, load_run_config

    recorded = out / "config.json"
    if resume and config is None and recorded.is_file():
        return build_run_config(json.loads(recorded.read_text()), overrides, where=str(recorded))
    return load_run_config(config, overrides)
