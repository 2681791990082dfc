"""``mfdetr demo``: synthetic data → frozen detector cache → MaskNet training → mask AP, overlays, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Out = Annotated[Path, typer.Option("--out", help="Working folder for every output.")]
Quick = Annotated[bool, typer.Option("--quick", help="Fewer images and iterations (a few minutes).")]
Detector = Annotated[str, typer.Option("--detector", help="Detector preset (default: the shipped demo DINO).")]
Checkpoint = Annotated[
    Path | None, typer.Option("--checkpoint", help="Detector checkpoint (default: the preset's shipped weights).")
]
UntrainedDetector = Annotated[
    bool,
    typer.Option(
        "--untrained-detector", help="Use seeded untrained detector weights (runs the whole pipeline; APs near zero)."
    ),
]
TrainImages = Annotated[
    int | None, typer.Option("--train-images", help="Synthetic train images (default 400; quick 100).")
]
ValImages = Annotated[int | None, typer.Option("--val-images", help="Synthetic val images (default 100; quick 30).")]
Iterations = Annotated[
    int | None, typer.Option("--iterations", help="MaskNet training iterations (default 1000; quick 150).")
]
ImageSize = Annotated[int, typer.Option("--image-size", help="Shorter side of the synthetic images.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="MaskNet training batch size.")]
Overlays = Annotated[int, typer.Option("--overlays", help="Val images to draw overlays for.")]
OverlayThreshold = Annotated[float, typer.Option("--overlay-threshold", help="Draw instances scoring at least this.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the data and the training.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
Overrides = Annotated[list[str], typer.Option("--set", help="Recipe override section.key=value (repeatable).")]
Force = Annotated[bool, typer.Option("--force", help="Redo the demo in a non-empty --out.")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show tqdm progress bars.")]
Views = Annotated[
    str,
    typer.Option(
        "--views",
        help="Train cache views: orig, or orig,hflip (also cache the flipped images; training samples one "
        "view per image and epoch). Evaluation uses the original view.",
    ),
]
Codec = Annotated[str, typer.Option("--codec", help="Cache feature codec preset (see `mfdetr cache --codec`).")]
C1 = Annotated[
    str,
    typer.Option(
        "--c1",
        help="store: cache C1; recompute: cache the frozen stage 0 instead and recompute C1 from the images in "
        "training.",
    ),
]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    out: Out = Path("mfdetr-demo"),
    quick: Quick = False,
    detector: Detector = "demo",
    checkpoint: Checkpoint = None,
    untrained_detector: UntrainedDetector = False,
    train_images: TrainImages = None,
    val_images: ValImages = None,
    iterations: Iterations = None,
    image_size: ImageSize = 160,
    batch_size: BatchSize = 8,
    overlays: Overlays = 6,
    overlay_threshold: OverlayThreshold = 0.3,
    seed: Seed = 0,
    device: Device = "cpu",
    overrides: Overrides = [],  # noqa: B006 - typer reads the default, nothing mutates it
    force: Force = False,
    progress: Progress = True,
    views: Views = "orig",
    codec: Codec = "lossless",
    c1: C1 = "store",
) -> None:
    """Run the whole pipeline offline on synthetic data and print box AP, mask AP, times and cache size."""
    from mfdetr.cache.views import parse_views
    from mfdetr.engine.reports.demo import DemoOptions, run_demo
    from mfdetr.outputs import check_output_dir

    view_names = parse_views(views)
    check_output_dir(out)

    run_demo(
        DemoOptions(
            out=out,
            detector=detector,
            checkpoint=checkpoint,
            untrained_detector=untrained_detector,
            quick=quick,
            train_images=train_images,
            val_images=val_images,
            iterations=iterations,
            image_size=image_size,
            batch_size=batch_size,
            overlays=overlays,
            overlay_threshold=overlay_threshold,
            seed=seed,
            device=device,
            overrides=tuple(overrides),
            force=force,
            progress=progress,
            c1=c1,
            codec=codec,
            views=view_names,
        ),
        echo=typer.echo,
    )
