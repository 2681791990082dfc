"""``mfdetr eval``: segm AP of a trained mask network (and box AP of the cached detector) on a cache."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_interspersed_args": True})
    def evaluate(
        cache: Path = typer.Option(..., "--cache", help="Evaluation cache store (e.g. val2017)."),
        coco: Path = typer.Option(None, "--coco", help="COCO folder the cache was written from (GT annotations)."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="A training checkpoint, e.g. RUN/ckpt.pt."),
        config: Path = typer.Option(None, "--config", help="Instead of a checkpoint: a training-free config "
                                                           "(paper Table 1 baselines)."),
        out: Path = typer.Option(None, "--out", help="Write the mask predictions as a COCO results JSON."),
        batch_size: int = typer.Option(2, "--batch-size", help="Images per forward."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        annotations: Path = typer.Option(None, "--annotations", help="Override the annotation file."),
        overrides: list[str] = typer.Argument(None, help="Config overrides section.key=value."),
    ) -> None:
        """Evaluate MaskNet on a cache: COCO segm AP (masks) and bbox AP (cached detector boxes)."""
        from mfdetr.engine.stage2 import CacheSources, eval_from_cache, format_metrics
        from mfdetr.errors import MfdetrError

        if checkpoint is None and config is None:
            raise MfdetrError("pass --checkpoint RUN/ckpt.pt (or --config FILE for a training-free baseline)")
        metrics = eval_from_cache(CacheSources(cache=cache, coco=coco, annotations=annotations),
                                  checkpoint=checkpoint, config=config, overrides=list(overrides or []), out=out,
                                  batch_size=batch_size, device=device)
        typer.echo(format_metrics(metrics))
        if out is not None:
            typer.echo(f"results: {out}")
