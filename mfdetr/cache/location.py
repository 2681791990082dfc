"""Where a cache store lives: a local folder (a :class:`~pathlib.Path`) or any fsspec URL (``s3://``, ``gs://``).

:func:`store_location` turns what a user passed (``--out``/``--cache``) into a location: a plain path or a
``file://`` URL stays a :class:`~pathlib.Path` and every local code path is unchanged; a remote URL
becomes a :class:`RemotePath`, the small part of the ``pathlib`` interface the cache package needs
(``/``, ``name``, ``exists``, ``is_dir``, ``read_text``, ``write_text``, ``unlink``, ``relative_to``),
backed by the URL's fsspec filesystem. Credentials and endpoints come from the usual environment or
fsspec configuration (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
profiles); nothing here handles secrets.

Object stores have no rename and no directory, so what the local store gets from ``rename`` is got here
from single-object writes: an object (a chunk, a commit flag) is written by one PUT and appears whole
or not at all, so a killed writer leaves at most missing chunks of an uncommitted image, and the commit
flag of an image is still written after all its chunks (:class:`~mfdetr.cache.writer.CacheWriter`).

Race-free creation (:func:`claim_creation`): before building a new store, a creator writes the object
``<store>/mfdetr_creator.json`` holding a random token, as an *exclusive create* (S3 ``If-None-Match: *``,
fsspec ``mode="create"``): the object store itself lets exactly one of several concurrent creators
succeed. The winner builds the store (metadata, ``image_ids``, the manifest last, never deleting
anything); the others wait until the manifest appears and open it like any existing store (manifests
must match). A filesystem without exclusive create falls back to write, wait, read back: the creator
whose token is read back after a settling delay builds; if the object store still let two creators
through, both write identical array metadata and neither deletes anything, so no committed image can
be lost. A creator that died before the manifest appeared leaves a claim without a store: the claim
is taken over once it is older than :data:`STALE_CLAIM_S`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from mfdetr.errors import MfdetrError

CREATOR_OBJECT = "mfdetr_creator.json"
#: a creation claim this old without a manifest is from a creator that died: it may be taken over
STALE_CLAIM_S = 120.0
_LOCAL_PROTOCOLS = ("file", "local")


def is_remote(where: Any) -> bool:
    """True for a URL of a non-local fsspec filesystem (``s3://b/p``, ``gs://b/p``, ``memory://p``)."""
    if isinstance(where, RemotePath):
        return True
    s = str(where)
    return "://" in s and s.split("://", 1)[0].lower() not in _LOCAL_PROTOCOLS


def store_location(where: str | os.PathLike[str]) -> Path | RemotePath:
    """A cache location: a :class:`Path` for a plain path or ``file://`` URL, else a :class:`RemotePath`."""
    if isinstance(where, RemotePath):
        return where
    s = os.fspath(where) if not isinstance(where, str) else where
    if "://" not in s:
        return Path(s)
    protocol, rest = s.split("://", 1)
    if protocol.lower() in _LOCAL_PROTOCOLS:
        return Path(rest)
    return RemotePath.from_url(s)


def storage_problem(err: BaseException) -> str | None:
    """One line describing a storage or network failure (no credentials, no such bucket, connection
    refused, access denied), or ``None`` for an exception that is not one (a bug, a decoder failure)."""
    mod = type(err).__module__.split(".")[0]
    if mod in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "urllib3", "requests"):
        return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    if isinstance(err, (OSError, TimeoutError)):
        text = " ".join(str(err).split())[:200] or type(err).__name__
        return f"{type(err).__name__}: {text}"
    return None


def remote_error(where: Any, err: BaseException, doing: str, *, resumable: bool = False) -> MfdetrError:
    """A :class:`MfdetrError` naming the store URL for a storage failure while ``doing`` something."""
    problem = storage_problem(err) or f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    hint = ""
    low = problem.lower()
    if "credential" in low:
        hint = " (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    elif "nosuchbucket" in low or "bucket" in low and "not exist" in low:
        hint = " (the bucket does not exist)"
    elif "connect" in low or "endpoint" in low:
        hint = " (is the server reachable? AWS_ENDPOINT_URL names it)"
    tail = "; images committed so far are kept — rerun the same command to resume" if resumable else ""
    return MfdetrError(f"cannot {doing}: {problem}{hint}{tail}", path=str(where))


class _StorageTaskNoise(logging.Filter):
    """Drops asyncio's report of a storage client's background task that failed unobserved ("Task exception
    was never retrieved" with a network error): the operation that needed it fails too and is reported as
    one line naming the store, so the report is only a second, traceback-shaped copy of that failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or storage_problem(exc) is None or "never retrieved" not in record.getMessage()


def _quiet_storage_tasks() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _StorageTaskNoise) for f in log.filters):
        log.addFilter(_StorageTaskNoise())


class RemotePath:
    """A file or folder of a store on an fsspec filesystem (see the module doc).

    Args:
        fs: the filesystem (one instance per process and URL, as fsspec caches them).
        path: the path inside ``fs`` (``bucket/prefix/...`` for S3), without a trailing slash.
        protocol: the URL scheme (``s3``), used for display and to reopen the store in other processes.
    """

    def __init__(self, fs: Any, path: str, protocol: str) -> None:
        self.fs, self.path, self.protocol = fs, path.rstrip("/"), protocol

    @classmethod
    def from_url(cls, url: str) -> RemotePath:
        import fsspec

        protocol = url.split("://", 1)[0]
        _quiet_storage_tasks()
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise MfdetrError(
                f"no filesystem for this URL ({' '.join(str(e).split())[:160]}); install the "
                f"fsspec package of {protocol}:// (for S3: pip install mfdetr[s3])",
                path=url,
            ) from None
        return cls(fs, path, protocol)

    # --- the pathlib subset -------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, rel: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{os.fspath(rel).strip('/')}", self.protocol)

    def __getstate__(self) -> dict[str, Any]:  # the filesystem is rebuilt from the URL in another process
        return {"url": str(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = RemotePath.from_url(state["url"])
        self.fs, self.path, self.protocol = other.fs, other.path, other.protocol

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0], self.protocol)

    def relative_to(self, other: RemotePath | str) -> PurePosixPath:
        base = other.path if isinstance(other, RemotePath) else str(other)
        return PurePosixPath(self.path).relative_to(base)

    def _fresh(self) -> None:
        """Forget fsspec's listing cache here: other processes write the same store."""
        self.fs.invalidate_cache(self.path)

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def size(self) -> int | None:
        """Size in bytes, ``None`` if the object does not exist."""
        self._fresh()
        try:
            return int(self.fs.size(self.path))
        except FileNotFoundError:
            return None

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def listdir(self) -> list[str]:
        """Names directly under this folder (empty if there is none)."""
        self._fresh()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []

    def sizes_under(self) -> dict[str, int]:
        """Every object under this folder → its size (paths relative to it)."""
        self._fresh()
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(self.path) + 1 :]: int(info.get("size") or 0) for p, info in found.items()}

    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr ``FsspecStore`` over this folder (a new async filesystem instance of the same URL)."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(self), read_only=read_only)


def zarr_target(where: Path | RemotePath, *, read_only: bool) -> Any:
    """What ``zarr.open_group`` opens for a location: the folder path, or an ``FsspecStore``."""
    return where.zarr_store(read_only=read_only) if isinstance(where, RemotePath) else str(where)


def file_size(p: Path | RemotePath) -> int:
    """Size of a chunk file or object (raises ``FileNotFoundError`` if there is none)."""
    if isinstance(p, RemotePath):
        n = p.size()
        if n is None:
            raise FileNotFoundError(str(p))
        return n
    return os.stat(p).st_size


def claim_creation(where: RemotePath, *, settle_s: float = 0.5) -> bool:
    """Try to become the one creator of a new store at ``where`` (see the module doc): True if this
    process must build it, False if another creator did or is doing so (wait for its manifest)."""
    claim = where / CREATOR_OBJECT
    token = json.dumps({"token": uuid.uuid4().hex, "pid": os.getpid(), "time": time.time()})
    try:
        where.fs.pipe_file(claim.path, token.encode(), mode="create")
        return True
    except FileExistsError:
        pass
    except (TypeError, NotImplementedError):  # a filesystem without exclusive create
        if claim.exists():
            return False
        return _write_and_read_back(claim, token, settle_s)
    try:
        held = json.loads(claim.read_text())
    except (FileNotFoundError, ValueError):
        return False
    if time.time() - float(held.get("time", 0)) > STALE_CLAIM_S:  # its creator died before the manifest
        return _write_and_read_back(claim, token, settle_s)
    return False


def _write_and_read_back(claim: RemotePath, token: str, settle_s: float) -> bool:
    claim.write_text(token)
    time.sleep(settle_s)
    return claim.read_text() == token


def wait_for_manifest(where: RemotePath, manifest_present: Any, *, timeout_s: float = STALE_CLAIM_S) -> None:
    """Wait until ``manifest_present()`` (another creator finished), or raise :class:`MfdetrError`."""
    deadline = time.monotonic() + timeout_s
    while not manifest_present():
        if time.monotonic() > deadline:
            raise MfdetrError(
                f"another writer claimed the creation of this store ({CREATOR_OBJECT}) but no "
                f"manifest appeared within {timeout_s:.0f} s; if no writer is running, delete "
                f"{CREATOR_OBJECT} and rerun",
                path=str(where),
            )
        time.sleep(0.2)


__all__ = [
    "CREATOR_OBJECT",
    "RemotePath",
    "claim_creation",
    "file_size",
    "is_remote",
    "remote_error",
    "storage_problem",
    "store_location",
    "wait_for_manifest",
    "zarr_target",
]
