"""``mfdetr export``: the inference path as an ONNX graph with dynamic image size."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        detector: str = typer.Option(..., "--detector", help="Detector preset name (extra presets: $MFDETR_PLUGINS)."),
        checkpoint: Path = typer.Option(
            None,
            "--checkpoint",
            help="Detector checkpoint file (default: the preset's shipped weights, e.g. for 'demo').",
        ),
        masknet: Path = typer.Option(..., "--masknet", help="Trained MaskNet checkpoint (a run's ckpt.pt)."),
        out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
        masknet_only: bool = typer.Option(
            False, "--masknet-only", help="Export the mask network over DetectorOutput tensors only."
        ),
        opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    ) -> None:
        """Write an ONNX graph: frozen detector → MaskNet → top-K masks and scores (or MaskNet alone)."""
        from mfdetr.engine.inference.export import ExportJob, run_export

        run_export(
            ExportJob(
                detector=detector,
                masknet=masknet,
                out=out,
                checkpoint=checkpoint,
                masknet_only=masknet_only,
                opset=opset,
            ),
            echo=typer.echo,
        )
