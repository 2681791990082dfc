"""``mfdetr detectors show|save``: the architecture a preset, a preset file or a checkpoint
(``--detector auto``) resolves to; saved as a preset file loadable by path with ``--detector FILE``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

CATEGORIES_HELP = (
    "With --detector auto: the category of each class slot, in order (JSON list of {id, name}, or "
    "a COCO annotation file read in id order); recorded in the preset."
)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Show a detector's architecture or save it as a preset file.", no_args_is_help=True)
    app.add_typer(group, name="detectors")

    @group.command("show")
    def show(
        detector: str = typer.Argument(..., help="Preset name, preset file, or 'auto' (with --checkpoint)."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="Checkpoint to read the architecture from."),
        detector_config: Path = typer.Option(
            None,
            "--detector-config",
            help="Official config the detector was trained with (DINO .py, H-DETR .sh; read as data).",
        ),
        categories: Path = typer.Option(None, "--categories", help=CATEGORIES_HELP),
    ) -> None:
        """Print the resolved architecture (one summary line, then the preset file's JSON)."""
        from mfdetr.detectors.auto import describe_preset
        from mfdetr.detectors.preset_file import preset_record
        from mfdetr.detectors.resolve import resolve_detector

        det = resolve_detector(
            detector, checkpoint, config_file=detector_config, allow_missing_weights=True, slot_categories=categories
        )
        typer.echo(describe_preset(det.preset))
        typer.echo(json.dumps(preset_record(det.preset), indent=2))

    @group.command("save")
    def save(
        out: Path = typer.Argument(..., help="Preset file to write (.json)."),
        detector: str = typer.Option("auto", "--detector", help="Preset name, preset file, or 'auto'."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="Checkpoint to read the architecture from."),
        detector_config: Path = typer.Option(
            None, "--detector-config", help="Official config the detector was trained with."
        ),
        name: str = typer.Option(None, "--name", help="Preset name in the file (default: the resolved name)."),
        categories: Path = typer.Option(None, "--categories", help=CATEGORIES_HELP),
    ) -> None:
        """Save the resolved architecture as a preset file (use it as --detector FILE)."""
        from mfdetr.detectors.preset_file import save_preset_file
        from mfdetr.detectors.resolve import resolve_detector

        det = resolve_detector(
            detector,
            checkpoint,
            config_file=detector_config,
            allow_missing_weights=True,
            slot_categories=categories,
            need_categories=True,
        )  # the file keeps the slot map
        typer.echo(f"saved preset {name or det.name!r}: {save_preset_file(det.preset, out, name=name)}")
