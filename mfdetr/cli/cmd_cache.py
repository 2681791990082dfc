"""``mfdetr cache``: stage 1 — run a frozen detector once over a COCO split into a Zarr cache store."""

from __future__ import annotations

from pathlib import Path

import typer


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
    @app.command("cache")
    def cache(
        detector: str = typer.Option(..., "--detector", help="Detector preset name or file, or 'auto' (the architecture "
                                                                   "from the checkpoint; extra presets: $MFDETR_PLUGINS)."),
        checkpoint: Path = typer.Option(None, "--checkpoint",
                                        help="Detector checkpoint file (its sha256 goes in the manifest; default: "
                                             "the preset's shipped weights, e.g. for 'demo')."),
        detector_config: Path = typer.Option(None, "--detector-config",
                                             help="With --detector auto: the official config the detector was "
                                                  "trained with (DINO .py, H-DETR .sh; read as data)."),
        coco: Path = typer.Option(..., "--coco", help="COCO folder (SPLIT/ images, annotations/instances_SPLIT.json)."),
        split: str = typer.Option("val2017", "--split", help="Split to cache."),
        out: str = typer.Option(..., "--out", help="Store directory (created, or resumed if it exists)."),
        topk: int = typer.Option(100, "--topk", help="Queries kept per image (by score)."),
        enc_layers: str = typer.Option(None, "--enc-layers",
                                       help="Encoder layers to store, e.g. 4 or 4,6 (Table 15; default: the layer at "
                                            "two thirds of the detector's depth, 4 of 6)."),
        batch_size: int = typer.Option(1, "--batch-size", help="Images per detector forward."),
        shard: str = typer.Option(None, "--shard", help="i/n: this process writes store indices i, i+n, ... "
                                                         "(default: torchrun RANK/WORLD_SIZE, else all)."),
        device: str = typer.Option("cpu", "--device",
                                   help="cpu, cuda or cuda:N (cuda under torchrun: cuda:LOCAL_RANK)."),
        workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
        writer_threads: int = typer.Option(4, "--writer-threads", help="Background compression/writing threads "
                                                                       "(zstd releases the GIL)."),
        retry_skipped: bool = typer.Option(False, "--retry-skipped", help="Recompute images recorded as skipped."),
        repair: bool = typer.Option(False, "--repair", help="Decode and check every committed image first and "
                                                            "recompute the damaged ones (a plain rerun recomputes only "
                                                            "those with a damaged commit flag or a missing/empty file)."),
        annotation_file: Path = typer.Option(None, "--annotations", help="Override the instances JSON path."),
        categories: Path = typer.Option(None, "--categories",
                                        help="With --detector auto: the category of each class slot, in order (JSON "
                                             "list of {id, name} or a COCO annotation file), when the slots do not "
                                             "match the dataset's categories by count and order."),
        codec: str = typer.Option("lossless", "--codec",
                                  help="Feature codec preset: lossless (float16 + zstd-1), bitround-7, bitround-4 or "
                                       "quantize-1 (lossy, numcodecs; bounds in cache_schemas/v1/arrays.md). "
                                       "Recorded in the store; readers need no option."),
        c1: str = typer.Option("store", "--c1", help="store: write C1 (stride-4 backbone map); recompute: write no "
                                                      "C1 but the frozen stage 0, run in stage 2 on the decoded image."),
        views: str = typer.Option("orig", "--views",
                                  help="Image views to store: orig, or orig,hflip (the detector also runs on the "
                                       "horizontally flipped image; training samples one view per image and epoch)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print images and estimated bytes per codec preset "
                                                               "and C1 mode, compute nothing."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the tqdm progress bar."),
    ) -> None:
        """Cache a frozen detector's outputs (queries, boxes, logits, encoder maps, C1) for a COCO split."""
        from mfdetr.cache.run import CacheJob, parse_shard, run_cache
        from mfdetr.cache.views import parse_views

        view_names = parse_views(views)  # a bad --views fails before anything is read
        from mfdetr.detectors.resolve import resolve_detector

        cats = annotation_file or coco / "annotations" / f"instances_{split}.json"
        det = resolve_detector(detector, checkpoint, config_file=detector_config, need_file=True,
                               categories_file=cats, slot_categories=categories, echo=typer.echo)
        layers = _layers(enc_layers) if enc_layers is not None else (det.enc_layer,)
        job = CacheJob(detector=det.name, checkpoint=det.checkpoint, coco=coco, split=split, out=out, topk=topk,
                       enc_layers=layers, batch_size=batch_size, shard=parse_shard(shard),
                       device=device, num_workers=workers, writer_threads=writer_threads,
                       retry_skipped=retry_skipped, annotation_file=annotation_file, codec=codec,
                       repair=repair, c1=c1, views=view_names)
        run_cache(job, dry_run=dry_run, progress=progress, echo=typer.echo)
