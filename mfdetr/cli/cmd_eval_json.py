"""``mfdetr eval-json``: evaluate a COCO results file against a split's annotations."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class IouType(str, Enum):
    segm = "segm"
    bbox = "bbox"
    boundary = "boundary"
    both = "both"
    all = "all"


class Evaluator(str, Enum):
    pycocotools = "pycocotools"
    faster = "faster"


_TYPES = {IouType.both: ("segm", "bbox"), IouType.all: ("segm", "boundary", "bbox")}


def register(app: typer.Typer) -> None:
    @app.command("eval-json")
    def eval_json(
        coco: Path = typer.Option(..., "--coco", help="COCO folder (annotations/instances_{split}.json)."),
        results: Path = typer.Option(..., "--results", help="COCO results JSON (list of detections)."),
        split: str = typer.Option("val2017", "--split", help="Split whose annotations to use."),
        iou_type: IouType = typer.Option(
            IouType.segm, "--iou-type", help="segm, bbox, boundary (Boundary AP), both (segm + bbox) or all."
        ),
        evaluator: Evaluator = typer.Option(
            Evaluator.pycocotools,
            "--evaluator",
            help="segm/bbox evaluator: pycocotools or faster (faster-coco-eval); "
            "boundary always uses faster-coco-eval.",
        ),
        verbose: bool = typer.Option(False, "--verbose", help="Also print the evaluator's own summary."),
    ) -> None:
        """Evaluate a COCO results file (AP, AP50, AP75, APs, APm, APl in percent)."""
        from mfdetr.evaluation import annotation_path, evaluate, format_table, load_coco_gt, read_results_json

        types = _TYPES.get(iou_type, (iou_type.value,))
        gt = load_coco_gt(annotation_path(coco, split))
        dets = read_results_json(results, gt, types)
        typer.echo(f"{results}: {len(dets)} detections on {len(gt.imgs)} images of {split}")
        typer.echo(format_table({t: evaluate(gt, dets, t, verbose=verbose, evaluator=evaluator.value) for t in types}))
