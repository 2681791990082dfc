"""Caches on object storage, against a real S3 server on 127.0.0.1 (moto's standalone server,
``tests/s3_server.py``): ``mfdetr cache --out s3://...`` killed with SIGKILL and resumed, two concurrent
shard writers, ``inspect --verify``, training with DataLoader workers from S3, and the one-line errors
of a wrong bucket, missing credentials and a server that stops mid-write. Every store is compared
array by array with a local-disk cache of the same images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tests._fake_detector as fd
from tests.conftest import REPO, assert_user_error, cli, cli_env
from tests.s3_server import S3Server, assert_same_as_local, remote_arrays, serve_s3

N_IMAGES = 8


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from serve_s3(tmp_path_factory)


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


def remote_commits(url: str) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        return len(fs.ls(f"{path}/commit/c", detail=False))
    except FileNotFoundError:
        return 0


def popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mfdetr", *args],
        cwd=REPO,
        env={**cli_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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


def test_wrong_bucket_and_missing_credentials_are_one_line(
    s3: S3Server, coco: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    assert_user_error(
        cli(*fd.cache_args(coco, "s3://no-such-bucket-mfdetr/x")), "s3://no-such-bucket-mfdetr/x", "bucket"
    )
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


def test_unobserved_network_task_failures_print_no_traceback() -> None:
    """Opening a store on S3 silences asyncio's traceback for a background client task that failed with a
    network error nobody awaited (the failing operation itself reports one line); other task failures and
    other asyncio reports still get through."""
    import logging

    import aiohttp

    from mfdetr.cache.location import store_location

    store_location("s3://some-bucket/c")
    log = logging.getLogger("asyncio")

    def record(exc: BaseException, msg: str = "Task exception was never retrieved") -> logging.LogRecord:
        return log.makeRecord("asyncio", logging.ERROR, __file__, 1, msg, (), (type(exc), exc, None))

    assert not log.filter(record(aiohttp.ClientConnectionResetError("Cannot write to closing transport")))
    assert log.filter(record(ValueError("a bug")))
    assert log.filter(record(aiohttp.ClientConnectionResetError("x"), "Unhandled error in exception handler"))


def test_second_epoch_reads_nothing_from_the_server(s3: S3Server, coco: Path, reference: Path, tmp_path: Path) -> None:
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
            assert all(
                np.array_equal(a.numpy(), b.numpy()) for a, b in zip(out.enc_maps[4], ref.enc_maps[4], strict=True)
            )
        got.append(s3.counts())
    assert got[0][1] > 10_000 and got[1] == ({}, 0), got
    worker = pickle.loads(pickle.dumps(store))
    s3.reset_counts()
    for i in worker.complete_indices().tolist():
        worker.read(i)
    requests, fetched = s3.counts()
    assert fetched < got[0][1] / 20 and set(requests) <= {"GET"}, (requests, fetched)  # the commit flags only


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
