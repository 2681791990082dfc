"""``mfdetr demo`` end to end through the CLI (in-process), shortened (a few 40-px images, ``dino_tiny`` code with
random weights at 64-px preprocessing, a tiny MaskNet, a few iterations); and, only when the shipped
``demo`` detector's weights exist, a ``--quick`` demo whose mask AP must be well above chance."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import assert_user_error, cli, run_cli

from tests._tiny_detector import NAME, PLUGIN, TINY_MASKNET, save_detector_checkpoint

#: mask AP (COCO, 0-100) a --quick demo with the trained `demo` detector must exceed; chance is ~0
QUICK_DEMO_MIN_MASK_AP = 20.0


def _summary_value(text: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)}:\s+(nan|-?\d+(?:\.\d+)?)", text)
    assert m, f"no '{label}' line in:\n{text}"
    return float(m.group(1))


def test_shortened_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mfdetr.cache import CacheStore
    from mfdetr.detectors import get_preset
    from mfdetr.engine.inference.predict import load_masknet_checkpoint

    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    det = save_detector_checkpoint(tmp_path / "det.pth")
    out = tmp_path / "demo"
    sets = [a for o in TINY_MASKNET for a in ("--set", o)]
    proc = cli(
        "demo",
        "--out",
        out,
        "--detector",
        NAME,
        "--checkpoint",
        det,
        "--train-images",
        "6",
        "--val-images",
        "3",
        "--iterations",
        "3",
        "--image-size",
        "40",
        "--batch-size",
        "2",
        "--overlays",
        "2",
        "--overlay-threshold",
        "0",
        "--no-progress",
        *sets,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    text = proc.stdout
    # stage 1: both caches complete
    for split, n in (("train2017", 6), ("val2017", 3)):
        store = CacheStore.open(out / "cache" / split)
        assert len(store) == n and len(store.complete_indices()) == n and not store.skipped()
        assert re.search(rf"cache {split}: [\d.]+ MB on disk \([\d.]+ KB/image, {n} images\)", text), text
    # stage 2: a run folder with a checkpoint predict can load, metrics, val results
    ckpt = out / "run" / "ckpt.pt"
    mn = load_masknet_checkpoint(ckpt, preset=get_preset(NAME))
    assert mn.detector == NAME and mn.config.num_queries == 10
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines
    results = json.loads((out / "run" / "val_results.json").read_text())
    assert isinstance(results, list)
    # plot and overlays
    with Image.open(out / "curves.png") as im:
        assert im.width > 100 and im.height > 100
    pngs = sorted((out / "predict" / "overlays").glob("*.png"))
    assert len(pngs) == 2
    val = sorted((out / "synth" / "val2017").glob("*.jpg"))[:2]
    for png, src in zip(pngs, val, strict=True):
        with Image.open(png) as a, Image.open(src) as b:
            assert png.stem == src.stem and a.size == b.size
    pred = json.loads((out / "predict" / "predictions.json").read_text())
    assert pred["meta"]["score_threshold"] == 0.0 and len(pred["annotations"]) > 0  # every kept query drawn
    assert {c["name"] for c in pred["categories"]} >= {"disc", "box"}  # names from the synthetic annotations
    # the summary: APs are real numbers in [0, 100], one time per stage
    box_ap, mask_ap = _summary_value(text, "detector box AP (val)"), _summary_value(text, "mask AP (val)")
    boundary_ap = _summary_value(text, "boundary AP (val)")
    for ap in (box_ap, mask_ap, boundary_ap):
        assert math.isfinite(ap) and 0.0 <= ap <= 100.0
    for stage in ("synth", "cache train2017", "cache val2017", "train + eval", "plot", "overlays", "total"):
        assert re.search(rf"{re.escape(stage)} [\d.]+ s", text), (stage, text)


def test_demo_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    from mfdetr.engine.reports.demo import DemoOptions, run_demo
    from mfdetr.errors import MfdetrError

    (tmp_path / "keep.txt").write_text("mine")
    det = save_detector_checkpoint(tmp_path / "det.pth")
    with pytest.raises(MfdetrError, match="not empty: pass --force"):
        run_demo(DemoOptions(out=tmp_path, detector=NAME, checkpoint=det), echo=lambda _: None)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _demo_weights() -> Path | None:
    from mfdetr.detectors import get_preset, list_detectors
    from mfdetr.engine.inference.predict import detector_checkpoint
    from mfdetr.errors import MfdetrError

    if "demo" not in list_detectors():
        return None
    try:
        return detector_checkpoint(get_preset("demo"), None)
    except MfdetrError:
        return None


def test_demo_without_the_demo_detector_is_a_clear_error(tmp_path: Path) -> None:
    from mfdetr.detectors import list_detectors

    if _demo_weights() is not None:
        pytest.skip("the demo detector and its weights are installed")
    proc = cli("demo", "--out", tmp_path / "d", "--quick")
    if "demo" not in list_detectors():
        assert_user_error(proc, "'demo' is not registered", "--detector NAME --checkpoint FILE")
    else:
        assert_user_error(proc, "ships no weights", "--checkpoint")


@pytest.mark.slow
def test_quick_demo_mask_ap_well_above_chance(tmp_path: Path) -> None:
    """The README's ``mfdetr demo --quick`` with the shipped detector: a few minutes on 2 CPU cores."""
    if _demo_weights() is None:
        pytest.skip(
            "needs the trained `demo` detector (mfdetr/detectors/weights/demo_dino.pt, the 'demo' "
            "preset): mask AP well above chance cannot be asserted with random detector weights"
        )
    proc = run_cli("demo", "--out", tmp_path / "d", "--quick", "--no-progress", timeout=1800)  # a real process
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mask_ap = _summary_value(proc.stdout, "mask AP (val)")
    assert mask_ap >= QUICK_DEMO_MIN_MASK_AP, proc.stdout
    assert _summary_value(proc.stdout, "detector box AP (val)") >= QUICK_DEMO_MIN_MASK_AP


def test_demo_with_untrained_detector_runs_every_stage(tmp_path: Path) -> None:
    """The README's main job before the demo weights ship: the real `demo` architecture, untrained."""
    out = tmp_path / "d"
    proc = cli(
        "demo",
        "--out",
        out,
        "--untrained-detector",
        "--train-images",
        "3",
        "--val-images",
        "2",
        "--iterations",
        "2",
        "--batch-size",
        "2",
        "--overlays",
        "1",
        "--no-progress",
        "--set",
        "masknet.num_queries=10",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "detector_untrained.pt").is_file()
    assert (out / "run" / "ckpt.pt").is_file() and (out / "curves.png").is_file()
    assert len(list((out / "predict" / "overlays").glob("*.png"))) == 1
    assert "mask AP (val)" in proc.stdout and "untrained demo detector" in proc.stdout
    bad = cli("demo", "--out", tmp_path / "e", "--untrained-detector", "--checkpoint", out / "detector_untrained.pt")
    assert_user_error(bad, "exclude each other")
