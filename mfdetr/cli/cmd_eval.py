"""``mfdetr eval``: segm and Boundary AP of a trained mask network (and box AP of the cached detector) on a cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mfdetr.cli.options import OnlineSlotCategories, RemoteCacheDir

if TYPE_CHECKING:
    from mfdetr.engine.stage2 import CacheSources

Cache = Annotated[str | None, typer.Option("--cache", help="Evaluation cache store (e.g. val2017).")]
Coco = Annotated[
    Path | None,
    typer.Option(
        "--coco",
        help="COCO folder the cache was written from (GT annotations; default: the folder `mfdetr cache` "
        "recorded, if it still exists).",
    ),
]
Checkpoint = Annotated[Path | None, typer.Option("--checkpoint", help="A training checkpoint, e.g. RUN/ckpt.pt.")]
Config = Annotated[
    Path | None,
    typer.Option("--config", help="Instead of a checkpoint: a training-free config (paper Table 1 baselines)."),
]
Out = Annotated[Path | None, typer.Option("--out", help="Write the mask predictions as a COCO results JSON.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Annotations = Annotated[Path | None, typer.Option("--annotations", help="Override the annotation file.")]
Online = Annotated[
    bool,
    typer.Option(
        "--online",
        help="Run the detector on --coco/--split instead of a cache (needed for runs that fine-tuned the detector).",
    ),
]
Split = Annotated[str, typer.Option("--split", help="--online: COCO split to evaluate.")]
Detector = Annotated[str | None, typer.Option("--detector", help="--online: detector preset (default: the run's).")]
DetectorCheckpoint = Annotated[
    Path | None, typer.Option("--detector-checkpoint", help="--online: detector weights (default: the run's).")
]
DetectorConfig = Annotated[
    Path | None,
    typer.Option(
        "--detector-config",
        help="--online with --detector auto: the official config the detector was trained with "
        "(DINO .py, H-DETR .sh; read as data).",
    ),
]
MaxImages = Annotated[int, typer.Option("--max-images", help="--online, --baseline: evaluate the first N images only.")]
SkipDamaged = Annotated[
    bool,
    typer.Option(
        "--skip-damaged", help="Skip damaged cache images (AP over the others; they are listed) instead of stopping."
    ),
]
Evaluator = Annotated[
    str,
    typer.Option(
        "--evaluator",
        help="segm/bbox evaluator: pycocotools or faster (faster-coco-eval); Boundary AP always uses faster-coco-eval.",
    ),
]
Baseline = Annotated[
    str | None,
    typer.Option(
        "--baseline",
        help="sam: SAM prompted with the cache's boxes (needs --sam-checkpoint; the extra `sam`), next to --masknet.",
    ),
]
SamCheckpoint = Annotated[Path | None, typer.Option("--sam-checkpoint", help="--baseline sam: SAM weights file.")]
SamModel = Annotated[str, typer.Option("--sam-model", help="--baseline sam: vit_b, vit_l or vit_h.")]
SamTopK = Annotated[int, typer.Option("--sam-topk", help="--baseline sam: boxes per image (0: all cached).")]
MaskNet = Annotated[
    Path | None, typer.Option("--masknet", help="--baseline sam: a MaskNet RUN/ckpt.pt on the same cache.")
]
Images = Annotated[
    Path | None,
    typer.Option(
        "--images", help="--baseline sam: folder of the split's image files (default: the COCO split folder)."
    ),
]
PerCategory = Annotated[bool, typer.Option("--per-category", help="Also print the AP of every category.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Config overrides section.key=value.")]


def register(app: typer.Typer) -> None:
    app.command("eval", context_settings={"allow_interspersed_args": True})(evaluate)


def evaluate(
    cache: Cache = None,
    coco: Coco = None,
    checkpoint: Checkpoint = None,
    config: Config = None,
    out: Out = None,
    batch_size: BatchSize = 2,
    device: Device = "auto",
    annotations: Annotations = None,
    online: Online = False,
    split: Split = "val2017",
    detector: Detector = None,
    detector_checkpoint: DetectorCheckpoint = None,
    detector_config: DetectorConfig = None,
    max_images: MaxImages = 0,
    skip_damaged: SkipDamaged = False,
    evaluator: Evaluator = "pycocotools",
    baseline: Baseline = None,
    sam_checkpoint: SamCheckpoint = None,
    sam_model: SamModel = "vit_h",
    sam_topk: SamTopK = 0,
    masknet: MaskNet = None,
    images: Images = None,
    remote_cache_dir: RemoteCacheDir = None,
    per_category: PerCategory = False,
    categories: OnlineSlotCategories = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate MaskNet on a cache: COCO segm AP and Boundary AP (masks), bbox AP (cached detector boxes)."""
    from mfdetr.cache.readthrough import use_cache_root
    from mfdetr.engine.stage2 import CacheSources
    from mfdetr.errors import MfdetrError

    use_cache_root(remote_cache_dir)
    _check_evaluator(evaluator)
    run = _Settings(out, batch_size, device, max_images, evaluator, {} if per_category else None)
    if baseline is not None:
        return _eval_baseline(
            run,
            baseline=baseline,
            skip_damaged=skip_damaged,
            model_args=online or config is not None or bool(overrides),
            job=dict(
                cache=cache,
                sam_checkpoint=sam_checkpoint,
                sam_model=sam_model,
                masknet=masknet or checkpoint,
                coco=coco,
                annotations=annotations,
                images=images,
                topk=sam_topk,
            ),
        )
    _check_model_args(checkpoint, config, batch_size, max_images, out)
    if online:
        _eval_online(
            run,
            checkpoint=checkpoint,
            cache=cache,
            coco=coco,
            split=split,
            detector=detector,
            detector_checkpoint=detector_checkpoint,
            detector_config=detector_config,
            categories=categories,
        )
    elif cache is None:
        raise MfdetrError("pass --cache DIR (or --online --coco DIR --split SPLIT)")
    else:
        _eval_cache(
            run,
            CacheSources(cache=cache, coco=coco, annotations=annotations),
            checkpoint=checkpoint,
            config=config,
            overrides=list(overrides or []),
            skip_damaged=skip_damaged,
        )


@dataclass(frozen=True)
class _Settings:
    """The settings every evaluation shares (a checkpoint, a training-free config or the SAM baseline)."""

    out: Path | None
    batch_size: int
    device: str
    max_images: int
    evaluator: str
    per_cat: dict | None


def _check_evaluator(evaluator: str) -> None:
    from mfdetr.errors import MfdetrError
    from mfdetr.evaluation import EVALUATORS

    if evaluator not in EVALUATORS:
        raise MfdetrError(f"unknown --evaluator {evaluator!r} (choose from {', '.join(EVALUATORS)})")


def _check_model_args(
    checkpoint: Path | None, config: Path | None, batch_size: int, max_images: int, out: Path | None
) -> None:
    """The checks of an evaluation of a checkpoint (or a training-free config), on a cache or online."""
    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import check_output_file

    if checkpoint is None and config is None:
        raise MfdetrError("pass --checkpoint RUN/ckpt.pt (or --config FILE for a training-free baseline)")
    if batch_size < 1 or max_images < 0:
        raise MfdetrError(f"need --batch-size >= 1 and --max-images >= 0, got {batch_size} and {max_images}")
    if out is not None:
        check_output_file(out)


def _eval_baseline(run: _Settings, *, baseline: str, skip_damaged: bool, model_args: bool, job: dict) -> None:
    """``mfdetr eval --baseline sam``: SAM prompted with the cache's boxes, next to a trained MaskNet."""
    from mfdetr.errors import MfdetrError

    if model_args:
        raise MfdetrError(
            "--baseline compares on a --cache with a trained --masknet RUN/ckpt.pt (no --online, --config or overrides)"
        )
    from mfdetr.engine.inference.sam_baseline import BaselineJob, run_baseline

    job = dict(job, max_images=run.max_images, device=run.device, evaluator=run.evaluator, out=run.out)
    run_baseline(BaselineJob(**job), baseline=baseline, skip_damaged=skip_damaged, echo=typer.echo)


def _eval_online(
    run: _Settings,
    *,
    checkpoint: Path | None,
    cache: str | None,
    coco: Path | None,
    split: str,
    detector: str | None,
    detector_checkpoint: Path | None,
    detector_config: Path | None,
    categories: Path | None,
) -> None:
    """``mfdetr eval --online``: the run's MaskNet with the detector in the loop."""
    from mfdetr.engine.online import eval_online
    from mfdetr.engine.stage2 import format_metrics
    from mfdetr.errors import MfdetrError
    from mfdetr.evaluation import format_category_table

    if cache is not None or coco is None or checkpoint is None:
        raise MfdetrError("--online evaluates --checkpoint RUN/ckpt.pt on --coco DIR --split SPLIT (no --cache)")
    if detector is not None:
        from mfdetr.detectors.resolve import resolve_detector

        det = resolve_detector(
            detector,
            detector_checkpoint,
            config_file=detector_config,
            echo=typer.echo,
            categories_file=coco / "annotations" / f"instances_{split}.json",
            slot_categories=categories,
        )
        detector, detector_checkpoint = det.name, det.checkpoint
    metrics = eval_online(
        checkpoint,
        coco=coco,
        split=split,
        detector=detector,
        detector_checkpoint=detector_checkpoint,
        out=run.out,
        batch_size=run.batch_size,
        device=run.device,
        max_images=run.max_images,
        evaluator=run.evaluator,
        category_ap=run.per_cat,
        slot_categories=categories,
    )
    typer.echo(format_metrics(metrics))
    if run.per_cat:
        typer.echo(format_category_table(run.per_cat))
    if run.out is not None:
        typer.echo(f"results: {run.out}")


def _eval_cache(
    run: _Settings,
    src: CacheSources,
    *,
    checkpoint: Path | None,
    config: Path | None,
    overrides: list[str],
    skip_damaged: bool,
) -> None:
    """``mfdetr eval --cache``: a checkpoint (or a training-free config) on a cache."""
    from mfdetr.engine.damage import DamagePolicy
    from mfdetr.engine.stage2 import eval_from_cache, format_metrics
    from mfdetr.evaluation import format_category_table

    damage = DamagePolicy(skip=skip_damaged)
    metrics = eval_from_cache(
        src,
        checkpoint=checkpoint,
        config=config,
        overrides=overrides,
        out=run.out,
        batch_size=run.batch_size,
        device=run.device,
        damage=damage,
        evaluator=run.evaluator,
        category_ap=run.per_cat,
    )
    typer.echo(format_metrics(metrics))
    if run.per_cat:
        typer.echo(format_category_table(run.per_cat))
    if damage.skipped:
        ids = ", ".join(str(d.image_id) for d in damage.skipped)
        typer.echo(f"skipped damaged images: {len(damage.skipped)} (image ids {ids}); AP is over the others")
    if run.out is not None:
        typer.echo(f"results: {run.out}")
