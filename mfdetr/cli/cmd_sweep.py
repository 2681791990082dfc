"""``mfdetr sweep``: the paper's ablation tables from one cache (pipeline/ablations/*.toml)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("sweep", context_settings={"allow_interspersed_args": True})
    def sweep(
        sweep_file: Path = typer.Argument(
            ..., help="A sweep file, e.g. pipeline/ablations/table02_image_encoder.toml."
        ),
        cache: str = typer.Option(None, "--cache", help="Training cache store."),
        val_cache: str = typer.Option(None, "--val-cache", help="Validation cache store."),
        coco: Path = typer.Option(
            None,
            "--coco",
            help="COCO folder the caches were written from (default: the folder "
            "`mfdetr cache` recorded, if it still exists).",
        ),
        out: Path = typer.Option(None, "--out", help="Sweep folder (default runs/<sweep file name>)."),
        only: list[str] = typer.Option(None, "--only", help="Run only these variants (repeatable)."),
        online: bool = typer.Option(
            False,
            "--online",
            help="Train every variant online (Tables 11, 13: fine-tuning, large-scale jitter) instead of from a cache.",
        ),
        detector: str = typer.Option(None, "--detector", help="--online: detector preset name."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="--online: detector checkpoint file."),
        split: str = typer.Option("train2017", "--split", help="--online: COCO split to train on."),
        val_split: str = typer.Option("val2017", "--val-split", help="--online: COCO split to evaluate on."),
        topk: int = typer.Option(100, "--topk", help="--online: queries kept per image."),
        remote_cache_dir: str = typer.Option(
            None,
            "--remote-cache-dir",
            help="Node-local read-through copy of caches on object storage (s3://...): each object fetched once per node (default: $MFDETR_REMOTE_CACHE_DIR, else ~/.cache/mfdetr/remote; 'off' disables).",
        ),
        overrides: list[str] = typer.Argument(None, help="Overrides for every variant, e.g. train.iterations=2000."),
    ) -> None:
        """Train + evaluate every variant of a sweep file; write summary.md and summary.csv."""
        from mfdetr.cache.readthrough import use_cache_root

        use_cache_root(remote_cache_dir)
        from mfdetr.engine.sweep import load_sweep
        from mfdetr.errors import MfdetrError

        from mfdetr.outputs import check_output_dir

        spec = load_sweep(sweep_file)
        out_dir = check_output_dir(out or Path("runs") / sweep_file.stem)
        if online:
            if detector is None or coco is None or cache is not None or val_cache is not None:
                raise MfdetrError(
                    "--online needs --detector NAME --coco DIR (and usually --checkpoint FILE), "
                    "and no --cache/--val-cache"
                )
            from mfdetr.engine.online import sweep_online

            sweep_online(
                spec,
                detector=detector,
                checkpoint=str(checkpoint) if checkpoint else None,
                coco=str(coco),
                split=split,
                val_split=val_split,
                out_dir=out_dir,
                topk=topk,
                overrides=list(overrides or []),
                only=list(only or []),
                log=typer.echo,
            )
        else:
            if cache is None or val_cache is None:
                raise MfdetrError("pass --cache TRAIN --val-cache VAL (or --online --detector NAME --coco DIR)")
            from mfdetr.engine.stage2 import CacheSources, sweep_from_cache

            sweep_from_cache(
                spec,
                CacheSources(cache=cache, coco=coco, val_cache=val_cache),
                out_dir,
                overrides=list(overrides or []),
                only=list(only or []),
                log=typer.echo,
            )
        typer.echo((out_dir / "summary.md").read_text())
