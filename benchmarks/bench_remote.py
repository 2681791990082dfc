"""Reading a cache from object storage vs local disk: bytes fetched per epoch and images/s, N workers.

For a local store (``--cache``) and its copy on S3 (``--url s3://bucket/prefix``, uploaded first with
``--upload``; or ``--moto``: a local moto server on 127.0.0.1 and a fresh bucket, for a try without a
real object store), every image is read ``--epochs`` times through the training DataLoader settings
(:func:`mfdetr.engine.loading.loader_options`: forkserver/spawn workers, each reopening the store).
The remote store is read through a fresh node-local read-through cache
(:mod:`mfdetr.cache.readthrough`); "fetched" is what that cache folder grew by in the epoch (whole
objects downloaded from the server), so epoch 1 fetches the store and later epochs ~0 bytes.
It measures; it does not judge.

    python benchmarks/bench_remote.py --cache cache/demo/train2017 --moto --workers 0 2 4 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Images(Dataset[Any]):
    def __init__(self, store: Any) -> None:
        self.store, self.indices = store, store.complete_indices().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.store.read(self.indices[i])[0].queries.shape


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _epochs(store: Any, workers: int, epochs: int, node_cache: Path | None) -> list[tuple[int, float]]:
    from mfdetr.engine.loading import loader_options

    loader = DataLoader(_Images(store), batch_size=1, collate_fn=_as_list, **loader_options(workers))
    out = []
    for _ in range(epochs):
        before = _dir_bytes(node_cache) if node_cache else 0
        t0 = time.perf_counter()
        n = sum(len(b) for b in loader)
        dt = time.perf_counter() - t0
        out.append(((_dir_bytes(node_cache) - before) if node_cache else 0, n / max(dt, 1e-9)))
    return out


def _start_moto() -> str:
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    boto3.client("s3").create_bucket(Bucket="mfdetr-bench")
    return "s3://mfdetr-bench/cache"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a local cache store")
    ap.add_argument("--url", help="the same store on object storage (s3://bucket/prefix)")
    ap.add_argument("--upload", action="store_true", help="copy --cache to --url first")
    ap.add_argument("--moto", action="store_true", help="start a local moto S3 server and upload there")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    import fsspec

    from mfdetr.cache import CacheStore

    url = _start_moto() if args.moto else args.url
    if url is None:
        ap.error("pass --url s3://... (with --upload to copy the store there) or --moto")
    if args.moto or args.upload:
        fs, path = fsspec.core.url_to_fs(url)
        fs.put(str(Path(args.cache)) + "/", path, recursive=True)
    print(f"{'source':8s} {'workers':>7s} {'epoch':>5s} {'fetched':>12s} {'img/s':>9s}")
    for workers in args.workers:
        for epoch, (_, rate) in enumerate(_epochs(CacheStore.open(args.cache), workers, args.epochs, None), 1):
            print(f"{'disk':8s} {workers:7d} {epoch:5d} {'-':>12s} {rate:9.1f}")
        with tempfile.TemporaryDirectory(prefix="mfdetr-node-cache-") as tmp:
            store = CacheStore.open(url, remote_cache=Path(tmp))
            for epoch, (fetched, rate) in enumerate(_epochs(store, workers, args.epochs, Path(tmp)), 1):
                print(f"{'s3':8s} {workers:7d} {epoch:5d} {fetched:10d} B {rate:9.1f}")


if __name__ == "__main__":
    main()
