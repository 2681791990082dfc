"""Training from a cache on object storage in real processes: DataLoader workers reading S3 through the node
cache, and two torchrun launchers (standing for two machines) caching into one S3 store and training from it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests._fake_detector as fd
from tests.conftest import REPO, cli, cli_env, logged_losses
from tests.s3_server import S3Server, assert_same_as_local, serve_s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from serve_s3(tmp_path_factory)


@pytest.mark.slow
def test_training_with_workers_from_s3_equals_disk(s3: S3Server, tmp_path: Path) -> None:
    """``mfdetr train --cache s3://...`` in a real process with 2 DataLoader workers (forkserver/spawn)
    logs the losses of the same run on the local-disk copy of the cache."""

    coco = tmp_path / "coco"
    fd.make_coco(coco, n=4, split="train2017")
    ckpt = fd.save_fake_checkpoint(tmp_path / "fake.pth")
    url = f"s3://{s3.make_bucket()}/train"
    fd.write_cache(coco, "train2017", tmp_path / "disk", ckpt)
    fd.write_cache(coco, "train2017", url, ckpt)  # type: ignore[arg-type]
    train = {
        "device": "cpu",
        "iterations": 6,
        "batch_size": 2,
        "log_every": 1,
        "num_workers": 0,
        "progress": False,
        "lr": 1e-3,
        "checkpoint_every": 100,
    }
    for workers in (0, 2):
        cfg = tmp_path / f"w{workers}.toml"
        cfg.write_text(
            "\n".join(fd.toml_table("train", {**train, "num_workers": workers}) + fd.toml_table("masknet", fd.TINY))
        )
    disk = cli(
        "train",
        "--cache",
        tmp_path / "disk",
        "--coco",
        coco,
        "--config",
        tmp_path / "w0.toml",
        "--out",
        tmp_path / "run_disk",
    )
    assert disk.returncode == 0, disk.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mfdetr",
            "train",
            "--cache",
            url,
            "--coco",
            str(coco),
            "--config",
            str(tmp_path / "w2.toml"),
            "--out",
            str(tmp_path / "run_s3"),
            "--remote-cache-dir",
            str(tmp_path / "node"),
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert any(p.name == "0" for p in (tmp_path / "node").rglob("*"))  # chunks were read through the node cache
    ref, got = logged_losses(tmp_path / "run_disk"), logged_losses(tmp_path / "run_s3")
    assert len(ref) == 6 and got == ref


def _two_nodes(args: list[str], tmp_path: Path, name: str) -> list[subprocess.CompletedProcess[str]]:
    """``mfdetr ARGS`` under two torchrun launchers (``--nnodes 2 --nproc-per-node 1``) meeting at a c10d
    rendezvous on 127.0.0.1, as two machines would."""
    from tests.s3_server import _free_port

    port = _free_port()
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                name,
                "--node-rank",
                str(rank),
                "--monitor-interval",
                "1",
                "-m",
                "mfdetr",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def _cache_on_two_nodes(s3: S3Server, tmp_path: Path) -> tuple[Path, str]:
    """Cache 6 images into one S3 store from two launchers (3 images each), identical to a one-process cache
    in ``tmp_path / "one"``; returns the COCO folder and the store's URL."""
    coco = tmp_path / "coco"
    fd.make_coco(coco, n=6, split="train2017")
    ckpt = fd.save_fake_checkpoint(tmp_path / "fake.pth")
    url = f"s3://{s3.make_bucket()}/nodes"
    args = [
        "cache",
        "--detector",
        fd.NAME,
        "--checkpoint",
        str(ckpt),
        "--coco",
        str(coco),
        "--split",
        "train2017",
        "--topk",
        "8",
        "--enc-layers",
        "4",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]
    runs = _two_nodes([*args, "--out", url], tmp_path, "cache")
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    done = sorted(int(r.stdout.split("done: ")[1].split(" images")[0]) for r in runs)
    assert done == [3, 3]  # global ranks 0 and 1 took every other image
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_as_local(tmp_path / "one", url)
    return coco, url


@pytest.mark.slow
def test_two_nodes_cache_and_train_from_one_s3_store(s3: S3Server, tmp_path: Path) -> None:
    """Two torchrun launchers (standing for two machines) write one S3 store, work split by global rank,
    identical to a single-process cache; DDP training from it (gloo) logs the losses of one process
    with the global batch."""

    coco, url = _cache_on_two_nodes(s3, tmp_path)
    train = {
        "device": "cpu",
        "iterations": 3,
        "log_every": 1,
        "num_workers": 0,
        "progress": False,
        "lr": 1e-3,
        "checkpoint_every": 100,
    }
    for name, bs in (("ddp", 1), ("single", 2)):
        (tmp_path / f"{name}.toml").write_text(
            "\n".join(fd.toml_table("train", {**train, "batch_size": bs}) + fd.toml_table("masknet", fd.TINY))
        )
    runs = _two_nodes(
        [
            "train",
            "--cache",
            url,
            "--coco",
            str(coco),
            "--config",
            str(tmp_path / "ddp.toml"),
            "--out",
            str(tmp_path / "run_ddp"),
        ],
        tmp_path,
        "train",
    )
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    single = cli(
        "train",
        "--cache",
        tmp_path / "one",
        "--coco",
        coco,
        "--config",
        tmp_path / "single.toml",
        "--out",
        tmp_path / "run_single",
    )
    assert single.returncode == 0, single.stderr
    run = json.loads((tmp_path / "run_ddp" / "run.json").read_text())
    assert (run["world_size"], run["backend"]) == (2, "gloo")
    a, b = logged_losses(tmp_path / "run_ddp"), logged_losses(tmp_path / "run_single")
    assert len(a) == len(b) == 3
    assert [x[1] for x in a] == pytest.approx([x[1] for x in b], abs=1e-5)
