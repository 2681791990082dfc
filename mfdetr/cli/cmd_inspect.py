"""``mfdetr inspect CACHE``: validate a cache store and print its manifest, completeness and arrays."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        cache: Path = typer.Argument(..., help="Cache store directory (made by `mfdetr cache`)."),
        max_skips: int = typer.Option(20, "--max-skips", help="Skipped images to list."),
    ) -> None:
        """Validate a cache store (exit 2 with a one-line error if invalid) and describe it."""
        from mfdetr.cache.inspect import inspect_store

        lines, _facts = inspect_store(cache, max_skips=max_skips)
        for line in lines:
            typer.echo(line)
