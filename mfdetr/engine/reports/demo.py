"""``mfdetr demo``: the whole two-stage pipeline offline on the synthetic dataset, in minutes on a CPU.

Stages (each one library call, timed):

1. ``synth`` — :func:`mfdetr.data.generate_synth` writes the synthetic COCO-format dataset;
2. ``cache train`` / ``cache val`` — :func:`mfdetr.cache.run.run_cache` runs the frozen detector
   (default: the shipped ``demo`` DINO) once over each split into a Zarr cache store (stage 1);
3. ``train + eval`` — :func:`mfdetr.engine.stage2.train_from_cache` trains MaskNet from the train cache
   and evaluates segm AP (masks) and box AP (the cached detector boxes) on the val cache, at a few
   points during training and at the end (stage 2); the run folder holds ``ckpt.pt``, ``metrics.jsonl``,
   ``val_results.json``;
4. ``plot`` — :func:`mfdetr.engine.reports.plot.plot_run` renders the loss / AP curves to ``curves.png``;
5. ``overlays`` — :func:`mfdetr.engine.inference.predict.run_predict` runs detector → MaskNet on a few val
   images and writes overlay PNGs (and their COCO JSON).

The MaskNet recipe (:func:`demo_run_config`) is the paper's architecture (every component: neck,
deformable image/box feature encoders, query encoder, dot-product head, mask scoring), slimmed for a
2-core CPU: one layer per encoder, a 32-dim box-feature space (Table 4's channel mapper), RoI 16×16,
top-20 queries (a synthetic image holds at most 7 objects and a crowd region); about 1 CPU-second per
training step of 8 images with the ``demo`` detector. The encoder layer follows paper Table 15's "layer 4 of 6": about
two thirds of the detector's encoder depth.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError

__all__ = ["DemoOptions", "DemoSummary", "demo_enc_layer", "demo_run_config", "format_demo_summary", "run_demo"]

#: the demo's sizes: (train images, val images, MaskNet iterations) — full and ``--quick``
FULL = (400, 100, 1000)
QUICK = (100, 30, 150)


@dataclass(frozen=True)
class DemoOptions:
    """What ``mfdetr demo`` was asked to do (``None`` = the full or ``--quick`` default)."""

    out: Path
    detector: str = "demo"
    checkpoint: Path | None = None
    #: seeded, untrained detector weights instead of trained ones: exercises the whole pipeline for real
    #: (e.g. before the ``demo`` weights are shipped); its APs are near zero by construction
    untrained_detector: bool = False
    quick: bool = False
    train_images: int | None = None
    val_images: int | None = None
    iterations: int | None = None
    image_size: int = 160
    batch_size: int = 8
    overlays: int = 6
    overlay_threshold: float = 0.3
    seed: int = 0
    device: str = "cpu"
    overrides: tuple[str, ...] = ()
    force: bool = False
    progress: bool = True
    #: "store" C1 in the caches, or "recompute" it in stage 2 from the stage 0 they carry
    c1: str = "store"
    codec: str = "lossless"
    #: image views of the train cache (``("orig", "hflip")``: MaskNet trains on one per image and epoch);
    #: the val cache holds the original view only (evaluation reads nothing else)
    views: tuple[str, ...] = ("orig",)

    def sizes(self) -> tuple[int, int, int]:
        base = QUICK if self.quick else FULL
        given = (self.train_images, self.val_images, self.iterations)  # 0 is a value given, not the default
        return tuple(b if g is None else g for g, b in zip(given, base, strict=True))  # type: ignore[return-value]


@dataclass
class DemoSummary:
    """What the demo measured and wrote."""

    out: Path
    detector: str
    train_images: int = 0
    val_images: int = 0
    iterations: int = 0
    views: tuple[str, ...] = ("orig",)  # image views of the train cache
    times: dict[str, float] = field(default_factory=dict)
    cache_bytes: dict[str, int] = field(default_factory=dict)
    cache_images: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    run_dir: Path | None = None
    plot: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    predictions: Path | None = None

    @property
    def mask_ap(self) -> float:
        return float(self.metrics.get("segm", {}).get("AP", float("nan")))

    @property
    def boundary_ap(self) -> float:
        return float(self.metrics.get("boundary", {}).get("AP", float("nan")))

    @property
    def box_ap(self) -> float:
        return float(self.metrics.get("bbox", {}).get("AP", float("nan")))


def demo_enc_layer(num_encoder_layers: int) -> int:
    """Paper Table 15 takes encoder layer 4 of 6: the layer at about two thirds of the depth."""
    from mfdetr.contracts import default_enc_layer

    return default_enc_layer(num_encoder_layers)


def demo_run_config(
    *, num_encoder_layers: int, topk: int, iterations: int, batch_size: int, seed: int, device: str, progress: bool
) -> dict[str, Any]:
    """The demo's stage-2 run recipe as plain data (``mfdetr train`` sections)."""
    return {
        "train": {
            "iterations": iterations,
            "batch_size": batch_size,
            "lr": 3e-4,
            "seed": seed,
            "num_workers": 0,
            "log_every": max(1, iterations // 50),
            "eval_every": max(1, iterations // 3),
            "checkpoint_every": 0,
            "device": device,
            "amp": "off",
            "progress": progress,
        },
        "masknet": {
            "num_queries": min(20, topk),
            "enc_layer": demo_enc_layer(num_encoder_layers),
            "roi_size": 16,
            "image_encoder": {"layers": 1},
            "box_encoder": {"layers": 1, "dim": 32, "heads": 4},
            "mask_scoring": {"channels": 32, "fc_dim": 64},
        },
        # at most 8 of each image's positives get a loss: the same mask AP as all of them, a faster step
        "assign": {"max_positives_per_image": 8},
    }


def _stage(times: dict[str, float], name: str, echo: Callable[[str], None]) -> Callable[[], None]:
    echo(f"== {name}")
    t0 = time.perf_counter()

    def done() -> None:
        times[name] = time.perf_counter() - t0

    return done


def _brief(echo: Callable[[str], None]) -> Callable[[str], None]:
    """The cache summary without its per-array table (``mfdetr inspect`` shows it)."""

    def say(line: str) -> None:
        if not line.startswith(("  ", "per array")):
            echo(line)

    return say


def _prepare(out: Path, force: bool) -> None:
    parts = ("synth", "cache", "run", "predict", "curves.png")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MfdetrError(
                "folder is not empty: pass --force to redo the demo there, or choose another --out", path=out
            )
        for p in parts:
            q = out / p
            if q.is_dir():
                shutil.rmtree(q)
            elif q.exists():
                q.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check(opts: DemoOptions) -> tuple[Any, Path | None, str]:
    """``(preset, detector checkpoint or None for an untrained one, device)`` after checking the options."""
    from mfdetr.detectors.registry import get_preset, list_detectors, load_plugins
    from mfdetr.engine.inference.predict import detector_checkpoint, resolve_device

    load_plugins()
    if opts.detector not in list_detectors():
        hint = (
            (
                " — the `demo` preset (a small DINO trained on the synthetic set, shipped with the package) is "
                "not in this installation; pass --detector NAME --checkpoint FILE to run the pipeline with "
                "another detector"
            )
            if opts.detector == "demo"
            else ""
        )
        raise MfdetrError(
            f"detector preset {opts.detector!r} is not registered (known: {', '.join(list_detectors())}){hint}"
        )
    preset = get_preset(opts.detector)
    if opts.untrained_detector and opts.checkpoint is not None:
        raise MfdetrError("--untrained-detector and --checkpoint exclude each other")
    ckpt = None if opts.untrained_detector else detector_checkpoint(preset, opts.checkpoint)
    n_train, n_val, iters = opts.sizes()
    if min(n_train, n_val, iters, opts.batch_size) < 1 or opts.overlays < 0:
        raise MfdetrError("demo sizes (images, iterations, batch size) must be >= 1")
    if not 0.0 <= opts.overlay_threshold <= 1.0:
        raise MfdetrError(f"--overlay-threshold must be in [0, 1], got {opts.overlay_threshold}")
    return preset, ckpt, str(resolve_device(opts.device))


def _cache_splits(
    opts: DemoOptions,
    s: DemoSummary,
    preset: Any,
    ckpt: Path,
    detector: Any,
    device: str,
    topk: int,
    echo: Callable[[str], None],
) -> dict[str, Path]:
    """Both splits of the synthetic set cached with the detector (flip views for train only)."""
    from mfdetr.cache.run import CacheJob, run_cache

    enc_layer = demo_enc_layer(preset.num_encoder_layers)
    stores = {}
    for split in ("train2017", "val2017"):
        done = _stage(s.times, f"cache {split}", echo)
        store = s.out / "cache" / split
        res = run_cache(
            CacheJob(
                detector=preset.name,
                checkpoint=ckpt,
                coco=s.out / "synth",
                split=split,
                out=store,
                topk=topk,
                enc_layers=(enc_layer,),
                batch_size=4,
                device=device,
                num_workers=0,
                writer_threads=2,
                c1=opts.c1,
                codec=opts.codec,
                views=opts.views if split == "train2017" else ("orig",),
            ),
            progress=opts.progress,
            echo=_brief(echo),
            detector=detector,
        )
        done()
        s.cache_bytes[split], s.cache_images[split] = res.store_bytes, res.store_done
        stores[split] = store
    return stores


def _overlays(
    opts: DemoOptions, s: DemoSummary, preset: Any, ckpt: Path, detector: Any, device: str, echo: Callable[[str], None]
) -> None:
    """The first ``opts.overlays`` val images predicted with the trained run (overlay PNGs)."""
    from mfdetr.engine.inference.predict import PredictJob, run_predict

    synth = s.out / "synth"
    images = sorted(p for p in (synth / "val2017").iterdir() if p.suffix == ".jpg")[: opts.overlays]
    pred = run_predict(
        PredictJob(
            detector=preset.name,
            masknet=s.run_dir / "ckpt.pt",
            inputs=tuple(map(str, images)),
            out=s.out / "predict",
            checkpoint=ckpt,
            score_threshold=opts.overlay_threshold,
            device=device,
            categories_file=synth / "annotations" / "instances_val2017.json",
        ),
        progress=opts.progress,
        echo=echo,
        detector=detector,
    )
    s.overlays, s.predictions = list(pred.overlays), pred.predictions_json


def run_demo(opts: DemoOptions, *, echo: Callable[[str], None] = print) -> DemoSummary:
    """Run every stage of the demo (see the module doc) and return its summary."""
    import torch

    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.detectors.registry import build_detector
    from mfdetr.engine.config import build_run_config
    from mfdetr.engine.inference.predict import preset_queries
    from mfdetr.engine.reports.plot import plot_run
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    preset, ckpt, device = _check(opts)
    n_train, n_val, iters = opts.sizes()
    out = Path(opts.out)
    _prepare(out, opts.force)
    if ckpt is None:
        from mfdetr.detectors.training.recipe import build_trainable, save_weights

        ckpt = save_weights(build_trainable(preset.name, seed=opts.seed), out / "detector_untrained.pt")
        echo(f"untrained {preset.name} detector (seed {opts.seed}) written to {ckpt}: APs will be near zero")
    s = DemoSummary(
        out=out, detector=preset.name, train_images=n_train, val_images=n_val, iterations=iters, views=tuple(opts.views)
    )
    t_all = time.perf_counter()
    torch.manual_seed(opts.seed)

    done = _stage(s.times, "synth", echo)
    synth = out / "synth"
    generate_synth(synth, config=SynthConfig(train=n_train, val=n_val, image_size=opts.image_size, seed=opts.seed))
    done()
    echo(f"synthetic dataset: {n_train} train + {n_val} val images at {opts.image_size} px in {synth}")

    detector = build_detector(preset.name, checkpoint=ckpt, device=device)
    topk = min(100, preset_queries(preset))
    stores = _cache_splits(opts, s, preset, ckpt, detector, device, topk, echo)

    done = _stage(s.times, "train + eval", echo)
    cfg = build_run_config(
        demo_run_config(
            num_encoder_layers=preset.num_encoder_layers,
            topk=topk,
            iterations=iters,
            batch_size=opts.batch_size,
            seed=opts.seed,
            device=device,
            progress=opts.progress,
        ),
        opts.overrides,
        where="demo recipe",
    )
    s.run_dir = out / "run"
    _, metrics = train_from_cache(
        cfg, CacheSources(cache=stores["train2017"], coco=synth, val_cache=stores["val2017"]), s.run_dir, log=echo
    )
    s.metrics = {k: dict(v) for k, v in metrics.items()}
    done()

    done = _stage(s.times, "plot", echo)
    s.plot = plot_run(s.run_dir, out / "curves.png")
    done()
    if opts.overlays:
        done = _stage(s.times, "overlays", echo)
        _overlays(opts, s, preset, ckpt, detector, device, echo)
        done()
    s.times["total"] = time.perf_counter() - t_all
    for line in format_demo_summary(s):
        echo(line)
    return s


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_demo_summary(s: DemoSummary) -> list[str]:
    """The demo's closing report (box AP of the detector, mask AP and Boundary AP, time per stage, cache bytes)."""
    seg, box, bnd = s.metrics.get("segm", {}), s.metrics.get("bbox", {}), s.metrics.get("boundary", {})
    lines = [
        f"demo summary: detector {s.detector}; {s.train_images} train / {s.val_images} val synthetic images; "
        f"MaskNet {s.iterations} iterations; train cache views {','.join(s.views)}",
        f"  detector box AP (val): {s.box_ap:.1f}   AP50 {box.get('AP50', float('nan')):.1f}   "
        f"AP75 {box.get('AP75', float('nan')):.1f}",
        f"  mask AP (val):         {s.mask_ap:.1f}   AP50 {seg.get('AP50', float('nan')):.1f}   "
        f"AP75 {seg.get('AP75', float('nan')):.1f}",
        f"  boundary AP (val):     {s.boundary_ap:.1f}   AP50 {bnd.get('AP50', float('nan')):.1f}   "
        f"AP75 {bnd.get('AP75', float('nan')):.1f}",
    ]
    for split, b in s.cache_bytes.items():
        n = max(s.cache_images.get(split, 0), 1)
        lines.append(
            f"  cache {split}: {_mb(b)} on disk ({b / n / 1e3:.1f} KB/image, {s.cache_images.get(split, 0)} images)"
        )
    lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.times.items()))
    lines.append(
        f"  outputs: run {s.run_dir} (ckpt.pt, metrics.jsonl, val_results.json), curves {s.plot}, "
        f"overlays {s.out / 'predict' / 'overlays'} ({len(s.overlays)} PNG)"
    )
    return lines
