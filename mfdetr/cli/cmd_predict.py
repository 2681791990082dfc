"""``mfdetr predict``: end-to-end inference on image files (frozen detector → MaskNet → masks)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        inputs: list[str] = typer.Argument(None, metavar="IMAGES_OR_DIRS...",
                                           help="Image files and/or folders (their image files, sorted); "
                                                "with --benchmark, default: synthetic images of --size."),
        detector: str = typer.Option(..., "--detector", help="Detector preset name or file, or 'auto' (the architecture "
                                                                   "from the checkpoint; extra presets: $MFDETR_PLUGINS)."),
        checkpoint: Path = typer.Option(None, "--checkpoint",
                                        help="Detector checkpoint file (default: the preset's shipped weights, "
                                             "e.g. for 'demo')."),
        detector_config: Path = typer.Option(None, "--detector-config",
                                             help="With --detector auto: the official config the detector was "
                                                  "trained with (DINO .py, H-DETR .sh; read as data)."),
        masknet: Path = typer.Option(..., "--masknet", help="Trained MaskNet checkpoint (a run's ckpt.pt)."),
        out: Path = typer.Option(None, "--out", help="Output folder: predictions.json, results.json, overlays/ "
                                                     "(required unless --benchmark)."),
        score_threshold: float = typer.Option(0.3, "--score-threshold",
                                              help="Keep instances scoring at least this (0 keeps all)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(1, "--batch-size", help="Images per forward."),
        workers: int = typer.Option(0, "--workers", help="Image-loading worker processes."),
        categories: Path = typer.Option(None, "--categories",
                                        help="Category names (JSON list of {id, name} or a COCO annotation file; "
                                             "default: the MaskNet run's record); with --detector auto also the "
                                             "category of each class slot, in order."),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay PNGs."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the tqdm progress bar."),
        benchmark: bool = typer.Option(False, "--benchmark",
                                       help="Write nothing: print the warm per-image time of preprocessing, "
                                            "detector, MaskNet and post-processing."),
        size: str = typer.Option("800x1333", "--size", help="--benchmark without images: synthetic image HxW."),
        num_images: int = typer.Option(2, "--num-images", help="--benchmark without images: how many."),
        warmup: int = typer.Option(1, "--warmup", help="--benchmark: untimed runs per image first."),
        repeats: int = typer.Option(3, "--repeats", help="--benchmark: timed runs per image."),
    ) -> None:
        """Segment objects in images: COCO-style JSON (RLE masks, category names) + overlay PNGs."""
        from mfdetr.detectors.resolve import resolve_detector
        from mfdetr.engine.inference.predict import PredictJob, run_predict
        from mfdetr.errors import MfdetrError
        from mfdetr.outputs import check_output_dir

        if workers < 0:
            raise MfdetrError(f"--workers must be >= 0, got {workers}")
        det = resolve_detector(detector, checkpoint, config_file=detector_config, slot_categories=categories,
                               need_categories=False, echo=typer.echo)  # the MaskNet run records the slot map
        if benchmark:
            from mfdetr.engine.inference.latency import benchmark_predict, format_report, parse_size

            report = benchmark_predict(detector=det.name, masknet=masknet, checkpoint=det.checkpoint,
                                       inputs=tuple(inputs or ()), size=parse_size(size), num_images=num_images,
                                       device=device, warmup=warmup, repeats=repeats)
            typer.echo(format_report(report, title=f"mfdetr predict --benchmark ({det.name})"))
            return
        if out is None:
            raise MfdetrError("--out is required (the output folder), unless --benchmark")
        if not inputs:
            raise MfdetrError("no images given (IMAGES_OR_DIRS...)")
        check_output_dir(out)

        job = PredictJob(detector=det.name, masknet=masknet, inputs=tuple(inputs), out=out, checkpoint=det.checkpoint,
                         score_threshold=score_threshold, device=device, batch_size=batch_size,
                         num_workers=workers, overlays=overlays, categories_file=categories)
        run_predict(job, progress=progress, echo=typer.echo)
