"""Run metrics reach TensorBoard: the event files ``MetricLogger`` writes read back with tensorboard's reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mfdetr.engine.metrics import MetricLogger, read_jsonl, read_scalars


def test_tensorboard_reads_our_file(tmp_path: Path) -> None:
    log = MetricLogger(tmp_path)
    for s in range(3):
        log.log("train", s, {"loss": 1.0 / (s + 1), "lr": 1.5e-4})
    log.log("eval", 2**40, {"AP": -3.0})
    log.close()
    files = list((tmp_path / "tb").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/AP", "train/loss", "train/lr"]
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1.5e-4, rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("eval/AP")] == [(2**40, -3.0)]
    # our reader is tensorboard's, file by file
    assert (2**40, "eval/AP", -3.0) in read_scalars(files[0])
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 2**40]


def test_resumed_logger_drops_later_records_and_writes_a_second_event_file(tmp_path: Path) -> None:
    log = MetricLogger(tmp_path)
    for s in range(1, 5):
        log.log("train", s, {"loss": float(s)})
    log.close()
    log = MetricLogger(tmp_path, resume_step=2)
    log.log("train", 3, {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "train"
    files = sorted((tmp_path / "tb").iterdir())
    assert len(files) == 2
    assert sorted(s for f in files for s, _, _ in read_scalars(f)) == [1, 2, 3, 3, 4]


def test_no_tensorboard_folder_when_disabled(tmp_path: Path) -> None:
    log = MetricLogger(tmp_path, tensorboard=False)
    log.log("train", 1, {"loss": float("nan")})
    log.close()
    assert not (tmp_path / "tb").exists()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"kind": "train", "step": 1, "loss": None}]
