"""``mfdetr cache``: stage 1 — run a frozen detector once over a COCO split into a Zarr cache store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mfdetr.cli.options import DetectorConfig, DetectorName, Progress

Checkpoint = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Detector checkpoint file (its sha256 goes in the manifest; default: the preset's shipped "
        "weights, e.g. for 'demo').",
    ),
]
Coco = Annotated[Path, typer.Option("--coco", help="COCO folder (SPLIT/ images, annotations/instances_SPLIT.json).")]
Split = Annotated[str, typer.Option("--split", help="Split to cache.")]
Out = Annotated[str, typer.Option("--out", help="Store directory (created, or resumed if it exists).")]
TopK = Annotated[int, typer.Option("--topk", help="Queries kept per image (by score).")]
EncLayers = Annotated[
    str | None,
    typer.Option(
        "--enc-layers",
        help="Encoder layers to store, e.g. 4 or 4,6 (Table 15; default: the layer at two thirds of the "
        "detector's depth, 4 of 6).",
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per detector forward.")]
Shard = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="i/n: this process writes store indices i, i+n, ... (default: torchrun RANK/WORLD_SIZE, else all).",
    ),
]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N (cuda under torchrun: cuda:LOCAL_RANK).")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")]
WriterThreads = Annotated[
    int, typer.Option("--writer-threads", help="Background compression/writing threads (zstd releases the GIL).")
]
RetrySkipped = Annotated[bool, typer.Option("--retry-skipped", help="Recompute images recorded as skipped.")]
Repair = Annotated[
    bool,
    typer.Option(
        "--repair",
        help="Decode and check every committed image first and recompute the damaged ones (a plain rerun "
        "recomputes only those with a damaged commit flag or a missing/empty file).",
    ),
]
AnnotationFile = Annotated[Path | None, typer.Option("--annotations", help="Override the instances JSON path.")]
Categories = Annotated[
    Path | None,
    typer.Option(
        "--categories",
        help="With --detector auto: the category of each class slot, in order (JSON list of {id, name} "
        "or a COCO annotation file), when the slots do not match the dataset's categories by count "
        "and order.",
    ),
]
Codec = Annotated[
    str,
    typer.Option(
        "--codec",
        help="Feature codec preset: lossless (float16 + zstd-1), bitround-7, bitround-4 or quantize-1 (lossy, "
        "numcodecs; bounds in cache_schemas/v1/arrays.md). Recorded in the store; readers need no "
        "option.",
    ),
]
C1 = Annotated[
    str,
    typer.Option(
        "--c1",
        help="store: write C1 (stride-4 backbone map); recompute: write no C1 but the frozen stage 0, run in "
        "stage 2 on the decoded image.",
    ),
]
Views = Annotated[
    str,
    typer.Option(
        "--views",
        help="Image views to store: orig, or orig,hflip (the detector also runs on the horizontally flipped "
        "image; training samples one view per image and epoch).",
    ),
]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Print images and estimated bytes per codec preset and C1 mode, compute nothing."),
]


def _layers(text: str) -> tuple[int, ...]:
    from mfdetr.errors import MfdetrError

    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MfdetrError(f"--enc-layers must be comma-separated integers (e.g. 4 or 4,6), got {text!r}") from None
    if not layers:
        raise MfdetrError("--enc-layers is empty")
    return layers


def register(app: typer.Typer) -> None:
    app.command("cache")(cache)


def cache(
    detector: DetectorName = ...,
    checkpoint: Checkpoint = None,
    detector_config: DetectorConfig = None,
    coco: Coco = ...,
    split: Split = "val2017",
    out: Out = ...,
    topk: TopK = 100,
    enc_layers: EncLayers = None,
    batch_size: BatchSize = 1,
    shard: Shard = None,
    device: Device = "cpu",
    workers: Workers = 2,
    writer_threads: WriterThreads = 4,
    retry_skipped: RetrySkipped = False,
    repair: Repair = False,
    annotation_file: AnnotationFile = None,
    categories: Categories = None,
    codec: Codec = "lossless",
    c1: C1 = "store",
    views: Views = "orig",
    dry_run: DryRun = False,
    progress: Progress = True,
) -> None:
    """Cache a frozen detector's outputs (queries, boxes, logits, encoder maps, C1) for a COCO split."""
    from mfdetr.cache.run import CacheJob, parse_shard, run_cache
    from mfdetr.cache.views import parse_views

    view_names = parse_views(views)  # a bad --views fails before anything is read
    from mfdetr.detectors.resolve import resolve_detector

    cats = annotation_file or coco / "annotations" / f"instances_{split}.json"
    det = resolve_detector(
        detector,
        checkpoint,
        config_file=detector_config,
        need_file=True,
        categories_file=cats,
        slot_categories=categories,
        echo=typer.echo,
    )
    layers = _layers(enc_layers) if enc_layers is not None else (det.enc_layer,)
    job = CacheJob(
        detector=det.name,
        checkpoint=det.checkpoint,
        coco=coco,
        split=split,
        out=out,
        topk=topk,
        enc_layers=layers,
        batch_size=batch_size,
        shard=parse_shard(shard),
        device=device,
        num_workers=workers,
        writer_threads=writer_threads,
        retry_skipped=retry_skipped,
        annotation_file=annotation_file,
        codec=codec,
        repair=repair,
        c1=c1,
        views=view_names,
    )
    run_cache(job, dry_run=dry_run, progress=progress, echo=typer.echo)
