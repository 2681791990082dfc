"""``mfdetr plot RUN``: the run's loss and AP curves as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot(
        run: Path = typer.Argument(..., help="A training run folder (holds metrics.jsonl)."),
        out: Path = typer.Option(None, "--out", help="PNG to write (default RUN/curves.png)."),
    ) -> None:
        """Render a run's training loss and evaluation AP curves to a PNG."""
        from mfdetr.engine.reports.plot import plot_run

        typer.echo(str(plot_run(run, out)))
