"""Exact resume: SIGKILL a real training process mid-run, resume it, compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mfdetr.engine import read_jsonl, read_scalars
from tests.conftest import cli_env
from tests.test_engine_toy import main as toy_main

TOY = Path(__file__).with_name("test_engine_toy.py")
COMMON = ["train.iterations=11", "train.batch_size=3", "train.checkpoint_every=4", "--images", "7"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOY), "--out", str(out), *COMMON, *extra], env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> dict[int, tuple[float, float, float]]:
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), steps  # no duplicates after resuming
    return {r["step"]: (r["loss"], r["loss_mask"], r["lr"]) for r in recs}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    toy_main(["--out", str(ref), *COMMON])  # the uninterrupted reference, in-process

    run, ready = tmp_path / "run", tmp_path / "ready"
    # the killed run uses a DataLoader worker, the reference none: the order must not depend on it
    proc = subprocess.Popen([sys.executable, str(TOY), "--out", str(run), *COMMON, "train.num_workers=1",
                             "--hang-after", "6", "--ready-file", str(ready)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.time() < deadline, "toy training never reached the kill point"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = read_jsonl(run / "metrics.jsonl")
    assert max(r["step"] for r in killed) == 6  # logged past the step-4 checkpoint, before the kill
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 4

    p = _run(run, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming at step 4" in p.stderr
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == list(range(1, 12)) and sorted(b) == sorted(a)
    assert a == b  # bit-identical on CPU, including the random point sampling and dropout
    ref_sd = torch.load(ref / "final_model.pt")
    run_sd = torch.load(run / "final_model.pt")
    assert all(torch.equal(ref_sd[k], run_sd[k]) for k in ref_sd)
    launches = json.loads((run / "run.json").read_text())["launches"]
    assert [x["start_step"] for x in launches] == [0, 4]
    # both launches wrote TensorBoard files; together they cover every step
    tb_steps = {s for f in (run / "tb").iterdir() for s, tag, _ in read_scalars(f) if tag == "train/loss"}
    assert tb_steps == set(range(1, 12))

