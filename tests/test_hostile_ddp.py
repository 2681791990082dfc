"""Hostile inputs under ``torchrun`` (gloo, 2 CPU processes): a damaged cache image read by one process
stops every process with the one-line error, promptly (no process left waiting in a collective call);
with ``--skip-damaged`` the run completes and records the image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tests._fake_detector as fd
from tests.conftest import REPO, cli, cli_env
from tests._fake_detector import cache_args, damage

N = 6  # images (and steps: 2 processes x 1 image each read every image once)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    root = tmp_path_factory.mktemp("hostile_ddp")
    coco = root / "coco"
    fd.make_coco(coco, n=N)
    fd.save_fake_checkpoint(coco / "fake.pth")
    store = root / "store"
    assert cli(*cache_args(coco, store, "--no-progress", enc_layers="4")).returncode == 0
    image_id = damage(store, "truncated")
    # 2 processes x 1 image x N steps: every image is read, each by one process only
    cfg = fd.write_run_config(
        root / "tiny.toml", device="cpu", iterations=N, batch_size=1, num_workers=0, progress=False, checkpoint_every=0
    )
    return {"root": root, "coco": coco, "store": store, "cfg": cfg, "image_id": image_id}


def torchrun(d: dict[str, Path | int], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            # the launcher looks at its processes every 5 s: each one exits on its own
            "--monitor-interval",
            "5",
            "-m",
            "mfdetr",
            "train",
            "--cache",
            str(d["store"]),
            "--coco",
            str(d["coco"]),
            "--config",
            str(d["cfg"]),
            "--out",
            str(out),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
def test_damage_read_by_one_process_stops_both(damaged: dict[str, Path | int], tmp_path: Path) -> None:
    proc = torchrun(damaged, tmp_path / "run")  # a hang would be a TimeoutExpired here
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "exitcode  : 2" in out and "SIGTERM" not in out, out  # neither was killed by the launcher
    # torchrun's launcher prints its own traceback (ChildFailedError); none comes from a training process
    assert "[rank" not in out and str(REPO / "mfdetr") not in out, out
    errors = [ln for ln in out.splitlines() if "mfdetr: error:" in ln]
    assert len(errors) == 2, out  # one line from each process
    assert all(f"image id {damaged['image_id']}" in ln and "c1" in ln for ln in errors), errors
    assert sum("stopped by process" in ln for ln in errors) == 1, errors  # the other process names who stopped
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_damage_skipped_under_torchrun_completes(damaged: dict[str, Path | int], tmp_path: Path) -> None:
    proc = torchrun(damaged, tmp_path / "run", "--skip-damaged")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "ckpt.pt").is_file()
    skipped = json.loads((tmp_path / "run" / "damaged_images.json").read_text())
    assert [d["image_id"] for d in skipped] == [damaged["image_id"]]
