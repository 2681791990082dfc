"""The ``mfdetr cache`` / ``mfdetr inspect`` CLI: SIGKILL + resume and 2 concurrent shards in real
subprocesses (the fake detector comes in through ``MFDETR_PLUGINS``); dry run, inspect and the one-line
errors through the same command group in this process (a subprocess costs seconds of torch import)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

import tests._fake_detector as fd
from tests._fake_detector import assert_same_store, cache_args
from tests.conftest import REPO, assert_user_error, cli, cli_env

N_IMAGES = 10
pytestmark = pytest.mark.usefixtures("fake_plugin")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_cli")
    fd.make_coco(root, n=N_IMAGES, corrupt=[7])
    fd.save_fake_checkpoint(root / "fake.pth")
    return root


def popen(args: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mfdetr", *args],
        cwd=REPO,
        env={**cli_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed(store: Path) -> int:
    d = store / "commit" / "c"
    return len([p for p in d.iterdir() if not p.name.endswith(".partial")]) if d.is_dir() else 0


@pytest.fixture(scope="module")
def reference(fake_plugin, coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    proc = cli(*cache_args(coco, out, "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_summary_and_inspect(reference):
    out, proc = reference
    assert f"done: {N_IMAGES - 1} images this run, 1 skipped" in proc.stdout
    assert "skipped index 6 (image id 7)" in proc.stdout and "corrupt or unreadable" in proc.stdout
    assert "bytes/image:" in proc.stdout and "enc_layer6_level0" in proc.stdout
    ins = cli("inspect", out)
    assert ins.returncode == 0, ins.stderr
    assert "valid (schema v1" in ins.stdout and f"{N_IMAGES - 1}/{N_IMAGES} done, 1 skipped, 0 pending" in ins.stdout
    assert "c1 " in ins.stdout and "zstd" in ins.stdout and "(10, 8, 32, 32)" in ins.stdout


def test_dry_run_estimates_before_compute(coco, tmp_path):
    proc = cli(*cache_args(coco, tmp_path / "s", "--dry-run"))
    assert proc.returncode == 0, proc.stderr
    assert f"images: {N_IMAGES} in val2017; 0 already done; {N_IMAGES} to compute" in proc.stdout
    assert "estimated bytes/image:" in proc.stdout and "estimated total:" in proc.stdout
    assert not (tmp_path / "s").exists()


def test_dry_run_on_a_finished_store_has_nothing_to_do(coco, reference):
    proc = cli(*cache_args(coco, reference[0], "--dry-run"))
    assert proc.returncode == 0, proc.stderr
    assert f"{N_IMAGES - 1} already done; 0 to compute" in proc.stdout


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_identical(coco, tmp_path, reference, cli_threads):
    out = tmp_path / "s"
    proc = popen(cache_args(coco, out), MFDETR_FAKE_SLEEP="0.4")
    try:
        deadline = time.monotonic() + 120
        while committed(out) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    store = zarr.open_group(str(out), mode="r")
    flags = store["commit"][:]
    assert 2 <= int((flags != 0).sum()) < N_IMAGES  # really interrupted mid-run
    resumed = cli(*cache_args(coco, out, "--no-progress"), check=True)  # the resume needs no process of its own
    assert f"{N_IMAGES - 1} done, 1 skipped, 0 pending" in resumed.stdout
    assert_same_store(reference[0], out)


@pytest.mark.slow
def test_two_concurrent_shards_fill_one_store(coco, tmp_path, reference):
    out = tmp_path / "s"
    a = popen(cache_args(coco, out, "--shard", "0/2", "--no-progress"))
    b = popen(cache_args(coco, out, "--no-progress"), RANK="1", WORLD_SIZE="2")  # torchrun's env
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert "(shard 0/2)" not in outs[0][0]  # progress is off; the summary counts this shard's images
    done = [int(o[0].split("done: ")[1].split(" images")[0]) for o in outs]
    assert sum(done) == N_IMAGES - 1 and min(done) >= 4
    assert_same_store(reference[0], out)


def test_user_errors_are_one_line(coco, tmp_path, reference, monkeypatch):
    assert_user_error(cli("inspect", tmp_path / "missing"), "cache store not found")
    assert_user_error(cli(*cache_args(coco, reference[0], "--topk", "5")), "different settings", "topk")
    assert_user_error(cli(*cache_args(coco, tmp_path / "s", "--shard", "2/2")), "--shard 2/2")
    assert_user_error(cli(*cache_args(coco, tmp_path / "s", "--enc-layers", "7")), "encoder layers 1..6")
    assert_user_error(cli(*cache_args(coco, tmp_path / "s", "--enc-layers", "4,x")), "comma-separated")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    assert_user_error(cli("inspect", bad), "not an mfdetr cache store")
    monkeypatch.setenv("MFDETR_PLUGINS", "tests._no_such_plugin")
    assert_user_error(cli(*cache_args(coco, tmp_path / "s")), "cannot import detector plugin 'tests._no_such_plugin'")
    assert not (tmp_path / "s").exists()


def test_inspect_fails_on_invalid_store(tmp_path, reference):
    """Exit 2 and one line for a corrupt store (an array's metadata deleted)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference[0], broken)
    (broken / "c1" / "zarr.json").unlink()
    assert_user_error(cli("inspect", broken), str(broken))
