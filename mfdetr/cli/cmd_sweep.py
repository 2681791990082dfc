"""``mfdetr sweep``: the paper's ablation tables from one cache (pipeline/ablations/*.toml)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("sweep", context_settings={"allow_interspersed_args": True})
    def sweep(
        sweep_file: Path = typer.Argument(..., help="A sweep file, e.g. pipeline/ablations/table02_image_encoder.toml."),
        cache: Path = typer.Option(..., "--cache", help="Training cache store."),
        val_cache: Path = typer.Option(..., "--val-cache", help="Validation cache store."),
        coco: Path = typer.Option(None, "--coco", help="COCO folder the caches were written from (GT annotations)."),
        out: Path = typer.Option(None, "--out", help="Sweep folder (default runs/<sweep file name>)."),
        only: list[str] = typer.Option(None, "--only", help="Run only these variants (repeatable)."),
        overrides: list[str] = typer.Argument(None, help="Overrides for every variant, e.g. train.iterations=2000."),
    ) -> None:
        """Train + evaluate every variant of a sweep file; write summary.md and summary.csv."""
        from mfdetr.engine.stage2 import CacheSources, sweep_from_cache
        from mfdetr.engine.sweep import load_sweep

        spec = load_sweep(sweep_file)
        out_dir = out or Path("runs") / sweep_file.stem
        sweep_from_cache(spec, CacheSources(cache=cache, coco=coco, val_cache=val_cache), out_dir,
                         overrides=list(overrides or []), only=list(only or []), log=typer.echo)
        typer.echo((out_dir / "summary.md").read_text())
