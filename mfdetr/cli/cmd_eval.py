"""``mfdetr eval``: segm and Boundary AP of a trained mask network (and box AP of the cached detector) on a cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from mfdetr.engine.stage2 import CacheSources


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_interspersed_args": True})
    def evaluate(
        cache: str = typer.Option(None, "--cache", help="Evaluation cache store (e.g. val2017)."),
        coco: Path = typer.Option(None, "--coco", help="COCO folder the cache was written from (GT annotations; default: the "
                                                       "folder `mfdetr cache` recorded, if it still exists)."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="A training checkpoint, e.g. RUN/ckpt.pt."),
        config: Path = typer.Option(None, "--config", help="Instead of a checkpoint: a training-free config "
                                                           "(paper Table 1 baselines)."),
        out: Path = typer.Option(None, "--out", help="Write the mask predictions as a COCO results JSON."),
        batch_size: int = typer.Option(2, "--batch-size", help="Images per forward."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        annotations: Path = typer.Option(None, "--annotations", help="Override the annotation file."),
        online: bool = typer.Option(False, "--online", help="Run the detector on --coco/--split instead of a cache "
                                                            "(needed for runs that fine-tuned the detector)."),
        split: str = typer.Option("val2017", "--split", help="--online: COCO split to evaluate."),
        detector: str = typer.Option(None, "--detector", help="--online: detector preset (default: the run's)."),
        detector_checkpoint: Path = typer.Option(None, "--detector-checkpoint",
                                                 help="--online: detector weights (default: the run's)."),
        detector_config: Path = typer.Option(None, "--detector-config",
                                             help="--online with --detector auto: the official config the detector "
                                                  "was trained with (DINO .py, H-DETR .sh; read as data)."),
        max_images: int = typer.Option(0, "--max-images", help="--online, --baseline: evaluate the first N images "
                                                               "only."),
        skip_damaged: bool = typer.Option(False, "--skip-damaged",
                                          help="Skip damaged cache images (AP over the others; they are listed) "
                                               "instead of stopping."),
        evaluator: str = typer.Option("pycocotools", "--evaluator",
                                      help="segm/bbox evaluator: pycocotools or faster (faster-coco-eval); Boundary "
                                           "AP always uses faster-coco-eval."),
        baseline: str = typer.Option(None, "--baseline", help="sam: SAM prompted with the cache's boxes (needs "
                                                               "--sam-checkpoint; the extra `sam`), next to --masknet."),
        sam_checkpoint: Path = typer.Option(None, "--sam-checkpoint", help="--baseline sam: SAM weights file."),
        sam_model: str = typer.Option("vit_h", "--sam-model", help="--baseline sam: vit_b, vit_l or vit_h."),
        sam_topk: int = typer.Option(0, "--sam-topk", help="--baseline sam: boxes per image (0: all cached)."),
        masknet: Path = typer.Option(None, "--masknet", help="--baseline sam: a MaskNet RUN/ckpt.pt on the same cache."),
        images: Path = typer.Option(None, "--images", help="--baseline sam: folder of the split's image files "
                                                           "(default: the COCO split folder)."),
        remote_cache_dir: str = typer.Option(None, "--remote-cache-dir", help="Node-local read-through copy of caches on object storage (s3://...): each object fetched once per node (default: $MFDETR_REMOTE_CACHE_DIR, else ~/.cache/mfdetr/remote; 'off' disables)."),
        per_category: bool = typer.Option(False, "--per-category", help="Also print the AP of every category."),
        categories: Path = typer.Option(None, "--categories",
                                        help="--online with --detector auto: the category of each class slot, in "
                                             "order (JSON list of {id, name} or a COCO annotation file)."),
        overrides: list[str] = typer.Argument(None, help="Config overrides section.key=value."),
    ) -> None:
        """Evaluate MaskNet on a cache: COCO segm AP and Boundary AP (masks), bbox AP (cached detector boxes)."""
        from mfdetr.cache.readthrough import use_cache_root
        from mfdetr.engine.stage2 import CacheSources
        from mfdetr.errors import MfdetrError
        from mfdetr.evaluation import EVALUATORS
        from mfdetr.outputs import check_output_file

        use_cache_root(remote_cache_dir)
        if evaluator not in EVALUATORS:
            raise MfdetrError(f"unknown --evaluator {evaluator!r} (choose from {', '.join(EVALUATORS)})")
        if baseline is not None:
            if online or config is not None or overrides:
                raise MfdetrError("--baseline compares on a --cache with a trained --masknet RUN/ckpt.pt (no --online, "
                                  "--config or overrides)")
            return _eval_baseline(dict(cache=cache, sam_checkpoint=sam_checkpoint, sam_model=sam_model,
                                       masknet=masknet or checkpoint, coco=coco, annotations=annotations,
                                       images=images, topk=sam_topk, max_images=max_images, device=device,
                                       evaluator=evaluator, out=out), baseline=baseline, skip_damaged=skip_damaged)
        if checkpoint is None and config is None:
            raise MfdetrError("pass --checkpoint RUN/ckpt.pt (or --config FILE for a training-free baseline)")
        if batch_size < 1 or max_images < 0:
            raise MfdetrError(f"need --batch-size >= 1 and --max-images >= 0, got {batch_size} and {max_images}")
        if out is not None:
            check_output_file(out)
        per_cat: dict | None = {} if per_category else None
        if online:
            _eval_online(checkpoint=checkpoint, cache=cache, coco=coco, split=split, detector=detector,
                         detector_checkpoint=detector_checkpoint, detector_config=detector_config, out=out,
                         batch_size=batch_size, device=device, max_images=max_images, evaluator=evaluator,
                         per_cat=per_cat, categories=categories)
        elif cache is None:
            raise MfdetrError("pass --cache DIR (or --online --coco DIR --split SPLIT)")
        else:
            _eval_cache(CacheSources(cache=cache, coco=coco, annotations=annotations), checkpoint=checkpoint,
                        config=config, overrides=list(overrides or []), out=out, batch_size=batch_size, device=device,
                        skip_damaged=skip_damaged, evaluator=evaluator, per_cat=per_cat)


def _eval_baseline(job: dict, *, baseline: str, skip_damaged: bool) -> None:
    """``mfdetr eval --baseline sam``: SAM prompted with the cache's boxes, next to a trained MaskNet."""
    from mfdetr.engine.inference.sam_baseline import BaselineJob, run_baseline

    run_baseline(BaselineJob(**job), baseline=baseline, skip_damaged=skip_damaged, echo=typer.echo)


def _eval_online(*, checkpoint: Path | None, cache: str | None, coco: Path | None, split: str, detector: str | None,
                 detector_checkpoint: Path | None, detector_config: Path | None, out: Path | None, batch_size: int,
                 device: str, max_images: int, evaluator: str, per_cat: dict | None, categories: Path | None) -> None:
    """``mfdetr eval --online``: the run's MaskNet with the detector in the loop."""
    from mfdetr.engine.online import eval_online
    from mfdetr.engine.stage2 import format_metrics
    from mfdetr.errors import MfdetrError
    from mfdetr.evaluation import format_category_table

    if cache is not None or coco is None or checkpoint is None:
        raise MfdetrError("--online evaluates --checkpoint RUN/ckpt.pt on --coco DIR --split SPLIT (no --cache)")
    if detector is not None:
        from mfdetr.detectors.resolve import resolve_detector

        det = resolve_detector(detector, detector_checkpoint, config_file=detector_config, echo=typer.echo,
                               categories_file=coco / "annotations" / f"instances_{split}.json",
                               slot_categories=categories)
        detector, detector_checkpoint = det.name, det.checkpoint
    metrics = eval_online(checkpoint, coco=coco, split=split, detector=detector,
                          detector_checkpoint=detector_checkpoint, out=out, batch_size=batch_size,
                          device=device, max_images=max_images, evaluator=evaluator,
                          category_ap=per_cat, slot_categories=categories)
    typer.echo(format_metrics(metrics))
    if per_cat:
        typer.echo(format_category_table(per_cat))
    if out is not None:
        typer.echo(f"results: {out}")


def _eval_cache(src: CacheSources, *, checkpoint: Path | None, config: Path | None, overrides: list[str], out: Path | None,
                batch_size: int, device: str, skip_damaged: bool, evaluator: str, per_cat: dict | None) -> None:
    """``mfdetr eval --cache``: a checkpoint (or a training-free config) on a cache."""
    from mfdetr.engine.damage import DamagePolicy
    from mfdetr.engine.stage2 import eval_from_cache, format_metrics
    from mfdetr.evaluation import format_category_table

    damage = DamagePolicy(skip=skip_damaged)
    metrics = eval_from_cache(src, checkpoint=checkpoint, config=config, overrides=overrides, out=out,
                              batch_size=batch_size, device=device, damage=damage, evaluator=evaluator,
                              category_ap=per_cat)
    typer.echo(format_metrics(metrics))
    if per_cat:
        typer.echo(format_category_table(per_cat))
    if damage.skipped:
        ids = ", ".join(str(d.image_id) for d in damage.skipped)
        typer.echo(f"skipped damaged images: {len(damage.skipped)} (image ids {ids}); AP is over the others")
    if out is not None:
        typer.echo(f"results: {out}")
