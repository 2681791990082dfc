"""Command-line options shared by several ``mfdetr`` commands, each declared once as an ``Annotated`` alias."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DetectorName = Annotated[
    str,
    typer.Option(
        "--detector",
        help="Detector preset name or file, or 'auto' (the architecture from the checkpoint; extra presets: "
        "$MFDETR_PLUGINS).",
    ),
]
DetectorConfig = Annotated[
    Path | None,
    typer.Option(
        "--detector-config",
        help="With --detector auto: the official config the detector was trained with (DINO .py, "
        "H-DETR .sh; read as data).",
    ),
]
OnlineSlotCategories = Annotated[
    Path | None,
    typer.Option(
        "--categories",
        help="--online with --detector auto: the category of each class slot, in order (JSON list of "
        "{id, name} or a COCO annotation file).",
    ),
]
RemoteCacheDir = Annotated[
    str | None,
    typer.Option(
        "--remote-cache-dir",
        help="Node-local read-through copy of caches on object storage (s3://...): each object "
        "fetched once per node (default: $MFDETR_REMOTE_CACHE_DIR, else ~/.cache/mfdetr/remote; "
        "'off' disables).",
    ),
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show the tqdm progress bar.")]
