"""A real S3-compatible server on 127.0.0.1 for tests: moto's standalone server in a thread of the test
process, reached over HTTP exactly like a remote object store (s3fs/botocore, no mocks in between).

:func:`s3_env` is the environment a client process needs (endpoint, dummy credentials, no metadata
service lookups); :class:`S3Server` counts the requests (and the bytes of GET responses) it served, so
a test can tell how much a reader fetched.
"""

from __future__ import annotations

import socket
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from moto.server import ThreadedMotoServer

import tests._fake_detector as fd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Counter:
    """WSGI middleware counting requests by method and the bytes of successful GET bodies."""

    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()
        self.requests: dict[str, int] = {}
        self.get_bytes = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "?")
        with self.lock:
            self.requests[method] = self.requests.get(method, 0) + 1
        body = list(self.app(environ, start_response))
        if method == "GET":
            with self.lock:
                self.get_bytes += sum(len(b) for b in body)
        return body


class S3Server:
    """moto's server on a free port of 127.0.0.1 (see the module doc)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.counter: _Counter | None = None

    def start(self) -> None:
        self._server.start()
        srv = self._server._server  # the werkzeug server: wrap its app to count requests
        if srv is not None and self.counter is None:
            self.counter = _Counter(srv.app)
            srv.app = self.counter

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def make_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"mfdetr-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)
        return name

    def reset_counts(self) -> None:
        assert self.counter is not None
        with self.counter.lock:
            self.counter.requests.clear()
            self.counter.get_bytes = 0

    def counts(self) -> tuple[dict[str, int], int]:
        assert self.counter is not None
        with self.counter.lock:
            return dict(self.counter.requests), self.counter.get_bytes


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment of an S3 client talking to ``endpoint`` with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent",
    }


@contextmanager
def running_s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serve_s3(tmp_path_factory: Any) -> Iterator[S3Server]:
    """The body of a module-scoped ``s3`` fixture: a started server whose endpoint and credentials, the fake
    detector plugin and a node cache folder are in the environment until the module ends."""
    import logging

    import pytest

    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # s3fs keeps one filesystem per set of arguments for the whole process: one made for an earlier server
    # (another test module in this process) would still point at that server's endpoint
    S3FileSystem.clear_instance_cache()
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        mp.setenv("MFDETR_PLUGINS", "tests._fake_detector")
        mp.setenv("MFDETR_REMOTE_CACHE_DIR", str(tmp_path_factory.mktemp("node_cache")))
        yield server
    server.stop()
    S3FileSystem.clear_instance_cache()


def remote_arrays(url: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every array of the store at ``url`` and its manifest (without the creation time)."""
    from zarr.storage import FsspecStore

    root = zarr.open_group(FsspecStore.from_url(url, read_only=True), mode="r")
    manifest = dict(root.attrs["mfdetr_cache"])
    manifest.pop("created_utc")
    with warnings.catch_warnings():  # zarr warns about the store's non-zarr objects (mfdetr_source.json)
        warnings.simplefilter("ignore")
        names = list(root.array_keys())
    return {n: root[n][:] for n in names}, manifest


def assert_same_as_local(local: Path, url: str) -> None:
    """The store at ``url`` holds the arrays and manifest of the local store ``local``."""
    xa = fd.read_all(local)
    xb, mb = remote_arrays(url)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name
    ma = dict(zarr.open_group(str(local), mode="r").attrs["mfdetr_cache"])
    ma.pop("created_utc")
    assert ma == mb
