"""``torchrun --nproc-per-node 2`` on CPU (gloo): same training as one process with the global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfdetr.engine import read_jsonl, seed_everything
from tests.conftest import cli_env
from tests._toy_engine import ToyMaskNet
from tests._toy_engine import main as toy_main

TOY = Path(__file__).with_name("_toy_engine.py")
COMMON = ["--images", "9", "--no-random", "--dropout", "0", "train.iterations=5", "train.checkpoint_every=0"]


@pytest.mark.slow
def test_torchrun_two_processes_equals_one_process_with_the_global_batch(tmp_path: Path) -> None:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(TOY),
            "--out",
            str(tmp_path / "ddp"),
            *COMMON,
            "train.batch_size=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "global batch 4 (2 x 2), lr 0.00015" in ddp.stderr
    assert ddp.stdout.count("TOY_DONE") == 1  # rank 0 only
    toy_main(["--out", str(tmp_path / "one"), *COMMON, "train.batch_size=4"])  # in-process reference
    rj = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert (rj["world_size"], rj["backend"], rj["global_batch"], rj["lr"]) == (2, "gloo", 4, 1.5e-4)
    a = [r["loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "train"]
    b = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(a) == len(b) == 5
    assert a == pytest.approx(b, abs=1e-5)  # gradient averaging over disjoint halves = the global batch
    sa, sb = torch.load(tmp_path / "ddp" / "final_model.pt"), torch.load(tmp_path / "one" / "final_model.pt")
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    seed_everything(42)
    init = ToyMaskNet().state_dict()
    assert not torch.allclose(sa["proj.weight"], init["proj.weight"])  # it did train
