"""Caches on object storage, against a real S3 server on 127.0.0.1 (moto's standalone server,
``tests/s3_server.py``): ``mfdetr cache --out s3://...`` killed with SIGKILL and resumed, two concurrent
shard writers, ``inspect --verify``, training with DataLoader workers from S3, and the one-line errors
of a wrong bucket, missing credentials and a server that stops mid-write. Every store is compared
array by array with a local-disk cache of the same images."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import tests._fake_detector as fd
from tests.conftest import REPO, assert_user_error, cli, cli_env, logged_losses
from tests.s3_server import S3Server

N_IMAGES = 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        mp.setenv("MFDETR_PLUGINS", "tests._fake_detector")
        mp.setenv("MFDETR_REMOTE_CACHE_DIR", str(tmp_path_factory.mktemp("node_cache")))
        yield server
    server.stop()


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco_s3")
    fd.make_coco(root, n=N_IMAGES, corrupt=[5])
    fd.save_fake_checkpoint(root / "fake.pth")
    return root


@pytest.fixture(scope="module")
def reference(s3: S3Server, coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref_s3") / "store"
    proc = cli(*fd.cache_args(coco, out, "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    return out


def remote_arrays(url: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from zarr.storage import FsspecStore

    root = zarr.open_group(FsspecStore.from_url(url, read_only=True), mode="r")
    manifest = dict(root.attrs["mfdetr_cache"])
    manifest.pop("created_utc")
    with warnings.catch_warnings():  # zarr warns about the store's non-zarr objects (mfdetr_source.json)
        warnings.simplefilter("ignore")
        names = list(root.array_keys())
    return {n: root[n][:] for n in names}, manifest


def assert_same_as_local(local: Path, url: str) -> None:
    xa = fd.read_all(local)
    xb, mb = remote_arrays(url)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name
    ma = dict(zarr.open_group(str(local), mode="r").attrs["mfdetr_cache"])
    ma.pop("created_utc")
    assert ma == mb


def remote_commits(url: str) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return len(fs.ls(f"{path}/commit/c", detail=False))
    except FileNotFoundError:
        return 0


def popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mfdetr", *args], cwd=REPO, env={**cli_env(), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_commits(url: str, proc: subprocess.Popen[str], n: int) -> None:
    deadline = time.monotonic() + 120
    while remote_commits(url) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "mfdetr cache never committed"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_on_s3_is_identical_to_disk(s3: S3Server, coco: Path, reference: Path) -> None:
    url = f"s3://{s3.make_bucket()}/caches/val"
    proc = popen(fd.cache_args(coco, url), {"MFDETR_FAKE_SLEEP": "0.4"})
    try:
        wait_for_commits(url, proc, 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    flags = remote_arrays(url)[0]["commit"]
    assert 2 <= int((flags != 0).sum()) < N_IMAGES  # really interrupted mid-run
    resumed = cli(*fd.cache_args(coco, url, "--no-progress"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{N_IMAGES - 1} done, 1 skipped, 0 pending" in resumed.stdout
    assert_same_as_local(reference, url)
    ins = cli("inspect", url, "--verify")
    assert ins.returncode == 0, ins.stderr
    assert f"{N_IMAGES - 1}/{N_IMAGES} done, 1 skipped, 0 pending, 0 damaged" in ins.stdout


@pytest.mark.slow
def test_two_concurrent_shard_writers_on_s3(s3: S3Server, coco: Path, reference: Path) -> None:
    """Two processes create the same new store at once (one wins the exclusive create) and fill it."""
    url = f"s3://{s3.make_bucket()}/shared"
    a = popen(fd.cache_args(coco, url, "--shard", "0/2", "--no-progress"), {})
    b = popen(fd.cache_args(coco, url, "--shard", "1/2", "--no-progress"), {})
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    done = [int(o[0].split("done: ")[1].split(" images")[0]) for o in outs]
    assert sum(done) == N_IMAGES - 1 and min(done) >= 3
    assert_same_as_local(reference, url)


def test_inspect_verify_finds_a_lost_object(s3: S3Server, coco: Path, reference: Path) -> None:
    import fsspec

    url = f"s3://{s3.make_bucket()}/v"
    proc = cli(*fd.cache_args(coco, url, "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    assert_same_as_local(reference, url)
    ins = cli("inspect", url, "--verify")
    assert ins.returncode == 0 and f"cache {url}: valid" in ins.stdout, ins.stderr
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm_file(f"{path}/queries/c/0/0/0")  # image index 0's queries lost
    ins = cli("inspect", url, "--verify")
    assert ins.returncode != 0 and "1 damaged" in ins.stdout and "queries" in ins.stdout, (ins.stdout, ins.stderr)
    rerun = cli(*fd.cache_args(coco, url, "--no-progress"))  # the damaged image is recomputed
    assert rerun.returncode == 0 and "done: 1 images this run" in rerun.stdout, rerun.stderr
    assert_same_as_local(reference, url)


def test_wrong_bucket_and_missing_credentials_are_one_line(s3: S3Server, coco: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    assert_user_error(cli(*fd.cache_args(coco, "s3://no-such-bucket-mfdetr/x")), "s3://no-such-bucket-mfdetr/x",
                      "bucket")
    assert_user_error(cli("inspect", "s3://no-such-bucket-mfdetr/x"), "bucket 'no-such-bucket-mfdetr'")
    bucket = s3.make_bucket()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert_user_error(cli(*fd.cache_args(coco, f"s3://{bucket}/x")), f"s3://{bucket}/x", "credentials")
        assert_user_error(cli("inspect", f"s3://{bucket}/x"), "NoCredentialsError")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_server_stopped_mid_write_is_one_line_and_resumable(s3: S3Server, coco: Path, reference: Path) -> None:
    """A second server (same moto backend) is stopped while a real ``mfdetr cache`` writes to it: one
    line, non-zero exit; started again on the same port, the rerun completes the store."""
    own = S3Server()
    own.start()
    bucket = own.make_bucket()
    url = f"s3://{bucket}/c"
    proc = popen(fd.cache_args(coco, url, "--no-progress"), {**own.env(), "MFDETR_FAKE_SLEEP": "0.4"})
    try:
        wait_for_commits(url, proc, 2)
        own.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_user_error(subprocess.CompletedProcess([], proc.returncode, "", err), url, "cannot")
    again = S3Server(port=own.port)
    again.start()
    try:
        committed = int((remote_arrays(url)[0]["commit"] != 0).sum())
        assert 2 <= committed < N_IMAGES
        rerun = cli(*fd.cache_args(coco, url, "--no-progress"))
        assert rerun.returncode == 0, rerun.stderr
        assert f"{N_IMAGES - 1} done, 1 skipped, 0 pending" in rerun.stdout
        assert_same_as_local(reference, url)
    finally:
        again.stop()


def test_second_epoch_reads_nothing_from_the_server(s3: S3Server, coco: Path, reference: Path,
                                                     tmp_path: Path) -> None:
    """The node-local read-through cache: every image read twice (two epochs), and once more by a store
    reopened in another process's way (unpickled, as a DataLoader worker): only the first epoch downloads."""
    import pickle

    from mfdetr.cache import CacheStore

    url = f"s3://{s3.make_bucket()}/e"
    assert cli(*fd.cache_args(coco, url, "--no-progress")).returncode == 0
    store = CacheStore.open(url, remote_cache=tmp_path / "node")
    local = CacheStore.open(reference)
    got = []
    for epoch in range(2):
        s3.reset_counts()
        for i in store.complete_indices().tolist():
            out, _ = store.read(i)
            ref, _ = local.read(i)
            assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(out.enc_maps[4], ref.enc_maps[4], strict=True))
        got.append(s3.counts())
    assert got[0][1] > 10_000 and got[1] == ({}, 0), got
    worker = pickle.loads(pickle.dumps(store))
    s3.reset_counts()
    for i in worker.complete_indices().tolist():
        worker.read(i)
    requests, fetched = s3.counts()
    assert fetched < got[0][1] / 20 and set(requests) <= {"GET"}, (requests, fetched)  # the commit flags only


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
    train = {"device": "cpu", "iterations": 6, "batch_size": 2, "log_every": 1, "num_workers": 0, "progress": False,
             "lr": 1e-3, "checkpoint_every": 100}
    for workers in (0, 2):
        cfg = tmp_path / f"w{workers}.toml"
        cfg.write_text("\n".join(fd.toml_table("train", {**train, "num_workers": workers}) + fd.toml_table("masknet", fd.TINY)))
    disk = cli("train", "--cache", tmp_path / "disk", "--coco", coco, "--config", tmp_path / "w0.toml",
                       "--out", tmp_path / "run_disk")
    assert disk.returncode == 0, disk.stderr
    proc = subprocess.run([sys.executable, "-m", "mfdetr", "train", "--cache", url, "--coco", str(coco), "--config",
                           str(tmp_path / "w2.toml"), "--out", str(tmp_path / "run_s3"),
                           "--remote-cache-dir", str(tmp_path / "node")], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600, check=False)
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
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name,
                               "--node-rank", str(rank), "--monitor-interval", "1", "-m", "mfdetr", *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


@pytest.mark.slow
def test_two_nodes_cache_and_train_from_one_s3_store(s3: S3Server, tmp_path: Path) -> None:
    """Two torchrun launchers (standing for two machines) write one S3 store, work split by global rank,
    identical to a single-process cache; DDP training from it (gloo) logs the losses of one process
    with the global batch."""

    coco = tmp_path / "coco"
    fd.make_coco(coco, n=6, split="train2017")
    ckpt = fd.save_fake_checkpoint(tmp_path / "fake.pth")
    url = f"s3://{s3.make_bucket()}/nodes"
    args = ["cache", "--detector", fd.NAME, "--checkpoint", str(ckpt), "--coco", str(coco), "--split", "train2017",
            "--topk", "8", "--enc-layers", "4", "--batch-size", "1", "--workers", "0", "--no-progress"]
    runs = _two_nodes([*args, "--out", url], tmp_path, "cache")
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    done = sorted(int(r.stdout.split("done: ")[1].split(" images")[0]) for r in runs)
    assert done == [3, 3]  # global ranks 0 and 1 took every other image
    one = cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert_same_as_local(tmp_path / "one", url)

    train = {"device": "cpu", "iterations": 3, "log_every": 1, "num_workers": 0, "progress": False, "lr": 1e-3,
             "checkpoint_every": 100}
    for name, bs in (("ddp", 1), ("single", 2)):
        (tmp_path / f"{name}.toml").write_text("\n".join(fd.toml_table("train", {**train, "batch_size": bs})
                                                         + fd.toml_table("masknet", fd.TINY)))
    runs = _two_nodes(["train", "--cache", url, "--coco", str(coco), "--config", str(tmp_path / "ddp.toml"),
                       "--out", str(tmp_path / "run_ddp")], tmp_path, "train")
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    single = cli("train", "--cache", tmp_path / "one", "--coco", coco, "--config", tmp_path / "single.toml",
                         "--out", tmp_path / "run_single")
    assert single.returncode == 0, single.stderr
    run = json.loads((tmp_path / "run_ddp" / "run.json").read_text())
    assert (run["world_size"], run["backend"]) == (2, "gloo")
    a, b = logged_losses(tmp_path / "run_ddp"), logged_losses(tmp_path / "run_single")
    assert len(a) == len(b) == 3
    assert [x[1] for x in a] == pytest.approx([x[1] for x in b], abs=1e-5)


def test_remote_reading_never_imports_a_detector(fresh_imports: dict[str, list[str]]) -> None:
    """The reader side (store, location, node cache, dataset) stays below the detectors."""
    bad = [m for m in fresh_imports["remote_reader"] if m.startswith("mfdetr.detectors")]
    assert not bad, bad


def test_file_url_is_the_local_store(s3: S3Server, reference: Path) -> None:
    from mfdetr.cache.location import RemotePath, store_location

    assert store_location(f"file://{reference}") == reference and store_location(str(reference)) == reference
    assert isinstance(store_location("s3://bucket/prefix"), RemotePath)
    ins = cli("inspect", f"file://{reference}")
    assert ins.returncode == 0 and f"{N_IMAGES - 1}/{N_IMAGES} done" in ins.stdout, ins.stderr


def test_creation_claim_is_exclusive_and_a_dead_creators_claim_is_taken_over() -> None:
    """The exclusive create that elects one creator of a new remote store (an in-memory fsspec filesystem)."""
    import uuid

    from mfdetr.cache.location import CREATOR_OBJECT, STALE_CLAIM_S, RemotePath, claim_creation

    where = RemotePath.from_url(f"memory://claims-{uuid.uuid4().hex}/store")
    assert claim_creation(where, settle_s=0.0)
    assert not claim_creation(where, settle_s=0.0) and not claim_creation(where, settle_s=0.0)
    claim = where / CREATOR_OBJECT
    held = json.loads(claim.read_text())
    claim.write_text(json.dumps({**held, "time": held["time"] - STALE_CLAIM_S - 1}))  # its creator died
    assert claim_creation(where, settle_s=0.0)
    assert not claim_creation(where, settle_s=0.0)
