"""``mfdetr predict --benchmark`` and ``benchmarks/bench_latency.py``: the per-stage breakdown exists and
every stage takes a positive time (no timing is asserted beyond that)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_user_error, cli
from tests._tiny_detector import save_masknet_checkpoint

STAGES = ("preprocess", "detector", "masknet", "postprocess")


def test_benchmark_breakdown_for_the_demo_detector(tmp_path: Path) -> None:
    from mfdetr.engine.inference.latency import STAGES as stages
    from mfdetr.engine.inference.latency import benchmark_predict, format_report

    assert stages == STAGES
    ckpt = save_masknet_checkpoint(tmp_path / "ckpt.pt", "demo", seed=0)
    report = benchmark_predict(
        detector="demo", masknet=ckpt, size=(40, 56), num_images=2, device="cpu", warmup=1, repeats=1
    )
    assert set(report.stages) == set(STAGES) and all(v > 0 for v in report.stages.values()), report.stages
    assert report.images == 2 and report.total == pytest.approx(sum(report.stages.values()))
    assert report.input_hw == [(160, 224), (160, 224)]  # the demo preset's preprocessing upsized them
    table = format_report(report, title="t")
    for s in (*STAGES, "total"):
        assert any(line.startswith(s) for line in table.splitlines()), table


def test_predict_benchmark_cli_and_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_masknet_checkpoint(tmp_path / "ckpt.pt", "demo", seed=0)
    proc = cli(
        "predict",
        "--benchmark",
        "--detector",
        "demo",
        "--masknet",
        ckpt,
        "--size",
        "32x48",
        "--num-images",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--device",
        "cpu",
        check=True,
    )
    rows = {
        ln.split()[0]: float(ln.split()[1])
        for ln in proc.stdout.splitlines()
        if ln.split() and ln.split()[0] in (*STAGES, "total")
    }
    assert set(rows) == {*STAGES, "total"} and all(v > 0 for v in rows.values()), proc.stdout
    out = tmp_path / "lat.json"
    script = REPO / "benchmarks" / "bench_latency.py"
    # one image, no warm-up: the script's default MaskNet (the full recipe) costs seconds per run on a CPU
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(script),
            "--preset",
            "demo",
            "--size",
            "32x48",
            "--num-images",
            "1",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first on sys.path
    runpy.run_path(str(script), run_name="__main__")  # the script as `python bench_latency.py` runs it
    assert "bench_latency (demo, images 32x48)" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert set(rec["seconds_per_image"]) == set(STAGES) and all(v > 0 for v in rec["seconds_per_image"].values())
    bad = cli("predict", "--benchmark", "--detector", "demo", "--masknet", ckpt, "--size", "big")
    assert_user_error(bad, "--size must be HxW")
    no_out = cli("predict", "--detector", "demo", "--masknet", ckpt, str(tmp_path))
    assert_user_error(no_out, "--out is required")
