"""Hostile arguments through the real command line, in-process: each case is refused with one line
(``mfdetr: error: ...``, exit 2) before any work, never a traceback, never a value silently replaced,
never a half-written output.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import cli, refused


def usage_error(r: subprocess.CompletedProcess[str]) -> None:
    """An option out of its declared range: the parser's usage error (exit 2), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr


def test_recipe_that_is_not_utf8_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[train]\nlr = \xff\xfe\n")
    refused(cli("train", "--cache", tmp_path, "--config", bad, "--out", tmp_path / "run"), str(bad), "not UTF-8")
    refused(cli("describe", "-c", bad), str(bad), "not UTF-8")
    assert not (tmp_path / "run").exists()


def test_describe_bad_levels_device_and_queries() -> None:
    for levels in ("8/x/32", "8/0/32", "/"):
        refused(cli("describe", "--levels", levels, "--no-flops"), "levels", "positive integer strides")
    refused(cli("describe", "--device", "tpu", "--input-size", "32x32", "-k", "4"), "unknown device 'tpu'")
    usage_error(cli("describe", "-k", "0", "--no-flops"))


def _run_folder(path: Path) -> Path:
    path.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_out_is_checked_before_drawing(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run")
    refused(cli("plot", run, "--out", tmp_path), str(tmp_path), "existing folder")
    refused(cli("plot", run, "--out", tmp_path / "curves.txt"), "curves.txt", ".png")
    assert not (tmp_path / "curves.txt").exists()
    r = cli("plot", run, "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "run"]  # no temporary file left


def test_inspect_negative_max_skips(tmp_path: Path) -> None:
    usage_error(cli("inspect", tmp_path, "--max-skips", "-1"))


def test_demo_zero_size_and_bad_threshold_are_refused_not_replaced(tmp_path: Path) -> None:
    for opt in ("--train-images", "--val-images", "--iterations"):
        refused(cli("demo", "--quick", "--out", tmp_path / "d", opt, "0"), "must be >= 1")
    for thr in ("-3", "1.5", "nan"):
        refused(cli("demo", "--quick", "--out", tmp_path / "d", "--overlay-threshold", thr), "--overlay-threshold")
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_full_disk_leaves_no_partial_output_and_is_one_line(tmp_path: Path) -> None:
    import errno

    import pytest
    import torch

    from mfdetr.engine.checkpoint import atomic_torch_save
    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import atomic_write

    target = tmp_path / "results.json"
    target.write_text("[]")  # an earlier, complete result

    def full(f: Any) -> None:
        f.write(b"[{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MfdetrError, match=r"results.json: cannot write the results JSON \(No space left on device\)"):
        atomic_write(target, full, what="results JSON")
    assert target.read_text() == "[]" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    class Unsaveable:  # torch.save fails while writing, as it does on a full disk
        def __reduce__(self) -> Any:
            raise RuntimeError("unexpected pos 108032 vs 107920")

    with pytest.raises(MfdetrError, match=r"ckpt.pt: cannot write the checkpoint"):
        atomic_torch_save({"w": torch.zeros(2), "x": Unsaveable()}, tmp_path / "ckpt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_two_commands_never_write_one_folder(tmp_path: Path) -> None:
    import pytest

    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import exclusive_folder

    run = tmp_path / "run"
    with exclusive_folder(run):
        (run / "metrics.jsonl").write_text("")
        with pytest.raises(MfdetrError, match="another mfdetr command is writing this folder"):
            with exclusive_folder(run):
                pass
    with exclusive_folder(run):  # released at the end of the first command
        pass
    with pytest.raises(MfdetrError, match="nope"):
        with exclusive_folder(tmp_path / "fresh"):
            raise MfdetrError("nope")
    assert not (tmp_path / "fresh").exists()  # a refused command leaves no empty folder behind


def test_a_device_is_never_replaced_by_an_output(tmp_path: Path) -> None:
    import os

    import pytest

    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import atomic_write, check_output_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        with pytest.raises(MfdetrError, match="not a regular file"):
            check_output_file(target)
        with pytest.raises(MfdetrError, match="not a regular file"):
            atomic_write(target, lambda f: f.write(b"x"), what="results JSON")
    assert not Path("/dev/null").is_file() and Path("/dev/null").is_char_device()
    refused(cli("plot", _run_folder(tmp_path / "run"), "--out", fifo), "not a regular file")
