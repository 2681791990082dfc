"""``mfdetr synth``: write the synthetic COCO-format instance-segmentation dataset."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        out: Path = typer.Option(..., "--out", help="Output folder (COCO layout: train2017/ val2017/ annotations/)."),
        train: int = typer.Option(200, "--train", help="Number of training images."),
        val: int = typer.Option(50, "--val", help="Number of validation images."),
        image_size: int = typer.Option(160, "--image-size", help="Shorter image side S (the longer is S..4S/3)."),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same bytes)."),
        force: bool = typer.Option(False, "--force", help="Overwrite the dataset in a non-empty --out."),
        classes: int = typer.Option(
            6, "--classes", help="Number of categories (6 shapes; more reuse a shape with another texture and hue)."
        ),
        first_category_id: int = typer.Option(
            1, "--first-category-id", help="Category id of the first class (the others follow)."
        ),
    ) -> None:
        """Make a synthetic COCO-format instance-segmentation dataset (6 shape/texture classes by default)."""
        from mfdetr.data.synth import SynthConfig, generate_synth
        from mfdetr.outputs import check_output_dir

        config = SynthConfig(
            train=train,
            val=val,
            image_size=image_size,
            seed=seed,
            num_classes=classes,
            first_category_id=first_category_id,
        )
        check_output_dir(out)
        summary = generate_synth(out, config=config, force=force)
        for split, st in summary["splits"].items():
            typer.echo(
                f"{split}: {st['images']} images, {st['instances']} instances "
                f"({st['crowd']} crowd), {st['empty_images']} without objects"
            )
        typer.echo(f"wrote {out}")
