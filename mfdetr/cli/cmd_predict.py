"""``mfdetr predict``: end-to-end inference on image files (frozen detector → MaskNet → masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfdetr.cli.options import DetectorConfig, DetectorName, Progress

Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="IMAGES_OR_DIRS...",
        help="Image files and/or folders (their image files, sorted); with --benchmark, "
        "default: synthetic images of --size.",
    ),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint", help="Detector checkpoint file (default: the preset's shipped weights, e.g. for 'demo')."
    ),
]
MaskNet = Annotated[Path, typer.Option("--masknet", help="Trained MaskNet checkpoint (a run's ckpt.pt).")]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Output folder: predictions.json, results.json, overlays/ (required unless --benchmark)."
    ),
]
ScoreThreshold = Annotated[
    float, typer.Option("--score-threshold", help="Keep instances scoring at least this (0 keeps all).")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward.")]
Workers = Annotated[int, typer.Option("--workers", help="Image-loading worker processes.")]
Categories = Annotated[
    Path | None,
    typer.Option(
        "--categories",
        help="Category names (JSON list of {id, name} or a COCO annotation file; default: the MaskNet "
        "run's record); with --detector auto also the category of each class slot, in order.",
    ),
]
Overlays = Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write overlay PNGs.")]
Benchmark = Annotated[
    bool,
    typer.Option(
        "--benchmark",
        help="Write nothing: print the warm per-image time of preprocessing, detector, MaskNet and post-processing.",
    ),
]
Size = Annotated[str, typer.Option("--size", help="--benchmark without images: synthetic image HxW.")]
NumImages = Annotated[int, typer.Option("--num-images", help="--benchmark without images: how many.")]
Warmup = Annotated[int, typer.Option("--warmup", help="--benchmark: untimed runs per image first.")]
Repeats = Annotated[int, typer.Option("--repeats", help="--benchmark: timed runs per image.")]


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def predict(
    inputs: Inputs = None,
    detector: DetectorName = ...,
    checkpoint: Checkpoint = None,
    detector_config: DetectorConfig = None,
    masknet: MaskNet = ...,
    out: Out = None,
    score_threshold: ScoreThreshold = 0.3,
    device: Device = "auto",
    batch_size: BatchSize = 1,
    workers: Workers = 0,
    categories: Categories = None,
    overlays: Overlays = True,
    progress: Progress = True,
    benchmark: Benchmark = False,
    size: Size = "800x1333",
    num_images: NumImages = 2,
    warmup: Warmup = 1,
    repeats: Repeats = 3,
) -> None:
    """Segment objects in images: COCO-style JSON (RLE masks, category names) + overlay PNGs."""
    from mfdetr.detectors.resolve import resolve_detector
    from mfdetr.engine.inference.predict import PredictJob, run_predict
    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import check_output_dir

    if workers < 0:
        raise MfdetrError(f"--workers must be >= 0, got {workers}")
    det = resolve_detector(
        detector,
        checkpoint,
        config_file=detector_config,
        slot_categories=categories,
        need_categories=False,
        echo=typer.echo,
    )  # the MaskNet run records the slot map
    if benchmark:
        from mfdetr.engine.inference.latency import benchmark_predict, format_report, parse_size

        report = benchmark_predict(
            detector=det.name,
            masknet=masknet,
            checkpoint=det.checkpoint,
            inputs=tuple(inputs or ()),
            size=parse_size(size),
            num_images=num_images,
            device=device,
            warmup=warmup,
            repeats=repeats,
        )
        typer.echo(format_report(report, title=f"mfdetr predict --benchmark ({det.name})"))
        return
    if out is None:
        raise MfdetrError("--out is required (the output folder), unless --benchmark")
    if not inputs:
        raise MfdetrError("no images given (IMAGES_OR_DIRS...)")
    check_output_dir(out)

    job = PredictJob(
        detector=det.name,
        masknet=masknet,
        inputs=tuple(inputs),
        out=out,
        checkpoint=det.checkpoint,
        score_threshold=score_threshold,
        device=device,
        batch_size=batch_size,
        num_workers=workers,
        overlays=overlays,
        categories_file=categories,
    )
    run_predict(job, progress=progress, echo=typer.echo)
