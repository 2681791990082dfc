"""``python -m mfdetr.detectors.training {train,eval,export}``: the detector training script.

- ``train --recipe R.toml --out DIR [section.key=value ...] [--max-steps N] [--no-resume]``
- ``eval --detector NAME [--checkpoint FILE] --coco DIR [--split val2017] [--max-images N]`` → box AP
- ``export CHECKPOINT OUT`` → ``{"model": state_dict}`` weights (float32, float16 if > 20 MB)

User mistakes print one line ``mfdetr: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> None:
    from mfdetr.config import apply_overrides, from_dict, load_toml
    from mfdetr.detectors.training.recipe import DetTrainConfig
    from mfdetr.engine.training.detector import train_detector

    cfg = from_dict(DetTrainConfig, apply_overrides(load_toml(args.recipe), args.overrides), where=str(args.recipe))
    summary = train_detector(
        cfg, args.out, resume=not args.no_resume, max_steps=args.max_steps, log=lambda s: print(s, flush=True)
    )
    print(json.dumps(summary), flush=True)


def _eval(args: argparse.Namespace) -> None:
    from mfdetr.detectors import build_detector
    from mfdetr.detectors.training.evaluate import box_ap

    model = build_detector(args.detector, checkpoint=args.checkpoint)
    ap = box_ap(model, args.coco, args.split, max_images=args.max_images)
    print(" ".join(f"{k}={v:.2f}" for k, v in ap.items()), flush=True)


def _export(args: argparse.Namespace) -> None:
    import torch

    from mfdetr.detectors.common.checkpoint import read_checkpoint, unwrap_state_dict
    from mfdetr.detectors.training.recipe import MAX_WEIGHTS_BYTES

    sd = unwrap_state_dict(read_checkpoint(args.checkpoint), origin=str(args.checkpoint))
    total = sum(v.numel() * v.element_size() for v in {v.data_ptr(): v for v in sd.values()}.values())
    if total > MAX_WEIGHTS_BYTES:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)


def main(argv: list[str] | None = None) -> int:
    from mfdetr.errors import MfdetrError

    p = argparse.ArgumentParser(prog="python -m mfdetr.detectors.training", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) a detector from a recipe")
    t.add_argument("--recipe", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    e = sub.add_parser("eval", help="box AP of a detector on a COCO split")
    e.add_argument("--detector", default="demo")
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--coco", type=Path, required=True)
    e.add_argument("--split", default="val2017")
    e.add_argument("--max-images", type=int, default=0)
    x = sub.add_parser("export", help="training checkpoint → shippable weights")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        {"train": _train, "eval": _eval, "export": _export}[args.cmd](args)
    except MfdetrError as err:
        print(f"mfdetr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
