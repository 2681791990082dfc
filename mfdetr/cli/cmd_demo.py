"""``mfdetr demo``: synthetic data → frozen detector cache → MaskNet training → mask AP, overlays, curves."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("mfdetr-demo"), "--out", help="Working folder for every output."),
        quick: bool = typer.Option(False, "--quick", help="Fewer images and iterations (a few minutes)."),
        detector: str = typer.Option("demo", "--detector", help="Detector preset (default: the shipped demo DINO)."),
        checkpoint: Path = typer.Option(None, "--checkpoint",
                                        help="Detector checkpoint (default: the preset's shipped weights)."),
        untrained_detector: bool = typer.Option(
            False, "--untrained-detector",
            help="Use seeded untrained detector weights (runs the whole pipeline; APs near zero)."),
        train_images: int = typer.Option(None, "--train-images",
                                         help="Synthetic train images (default 400; quick 100)."),
        val_images: int = typer.Option(None, "--val-images", help="Synthetic val images (default 100; quick 30)."),
        iterations: int = typer.Option(None, "--iterations",
                                       help="MaskNet training iterations (default 1000; quick 150)."),
        image_size: int = typer.Option(160, "--image-size", help="Shorter side of the synthetic images."),
        batch_size: int = typer.Option(8, "--batch-size", help="MaskNet training batch size."),
        overlays: int = typer.Option(6, "--overlays", help="Val images to draw overlays for."),
        overlay_threshold: float = typer.Option(0.3, "--overlay-threshold",
                                                help="Draw instances scoring at least this."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data and the training."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
        overrides: list[str] = typer.Option([], "--set", help="Recipe override section.key=value (repeatable)."),
        force: bool = typer.Option(False, "--force", help="Redo the demo in a non-empty --out."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show tqdm progress bars."),
        views: str = typer.Option("orig", "--views", help="Train cache views: orig, or orig,hflip (also cache the "
                                                           "flipped images; training samples one view per image "
                                                           "and epoch). Evaluation uses the original view."),
        codec: str = typer.Option("lossless", "--codec", help="Cache feature codec preset (see `mfdetr cache --codec`)."),
        c1: str = typer.Option("store", "--c1", help="store: cache C1; recompute: cache the frozen stage 0 instead "
                                                      "and recompute C1 from the images in training."),
    ) -> None:
        """Run the whole pipeline offline on synthetic data and print box AP, mask AP, times and cache size."""
        from mfdetr.cache.views import parse_views
        from mfdetr.engine.reports.demo import DemoOptions, run_demo
        from mfdetr.outputs import check_output_dir

        view_names = parse_views(views)
        check_output_dir(out)

        run_demo(DemoOptions(out=out, detector=detector, checkpoint=checkpoint, untrained_detector=untrained_detector, quick=quick, train_images=train_images,
                             val_images=val_images, iterations=iterations, image_size=image_size,
                             batch_size=batch_size, overlays=overlays,
                             overlay_threshold=overlay_threshold, seed=seed, device=device,
                             overrides=tuple(overrides), force=force, progress=progress, c1=c1,
                             codec=codec, views=view_names), echo=typer.echo)
