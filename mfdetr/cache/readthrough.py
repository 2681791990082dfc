"""A node-local read-through cache for stores on object storage: each object is fetched once per node.

:class:`ReadThroughStore` wraps the zarr store of a remote cache. The first read of an object (a chunk
or shard of one image, an array's metadata) downloads the whole object into a local folder, written
through a temporary file and an atomic rename, so concurrent DataLoader workers (and processes of
other runs on the node) share it and never see half a file; every later read, of any byte range, is
served from that file. From the second epoch on, training reads ~0 bytes from the server.

What is cached is what cannot change: data of committed images and metadata. Commit flags
(``commit/``) always go to the server (:func:`mfdetr.cache.store.read_commit_flags` reads them
directly). A store rewritten in place (``mfdetr cache --repair`` recomputing damaged images)
needs its node caches cleared (delete the folder :func:`cache_dir_for` names).

:func:`default_cache_root`: ``$MFDETR_REMOTE_CACHE_DIR`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/mfdetr/remote`` (``~/.cache/mfdetr/remote``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

ENV = "MFDETR_REMOTE_CACHE_DIR"
#: key prefixes never cached (they change while a store is written)
MUTABLE_PREFIXES = ("commit/",)


def default_cache_root() -> Path | None:
    """The node cache's root folder (see the module doc); ``None`` when disabled."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mfdetr" / "remote"


def use_cache_root(folder: str | None) -> None:
    """Make ``folder`` (``off`` = none) the node cache's root for this process and its DataLoader workers
    (``--remote-cache-dir``); ``None`` keeps the default."""
    if folder is not None:
        os.environ[ENV] = folder


def cache_dir_for(url: str, root: Path) -> Path:
    """The folder holding the node-local copies of the store at ``url``."""
    return root / hashlib.sha256(url.encode()).hexdigest()[:20]


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[len(data) - byte_range.suffix :]
    raise TypeError(f"unexpected byte range {byte_range!r}")


class ReadThroughStore(WrapperStore[Store]):
    """Serves reads of ``store`` from whole-object copies under ``local_dir`` (see the module doc)."""

    def __init__(self, store: Store, *, local_dir: str | os.PathLike[str]) -> None:
        super().__init__(store)
        self.local_dir = Path(local_dir)

    def _with_store(self, store: Store) -> ReadThroughStore:
        return type(self)(store, local_dir=self.local_dir)

    def _local(self, key: str) -> Path:
        return self.local_dir.joinpath(*key.split("/"))

    async def _fetch(self, key: str, prototype: BufferPrototype) -> bytes | None:
        """The whole object ``key`` from the local copy, downloading it first if there is none."""
        p = self._local(key)
        try:
            return p.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            pass
        buf = await self._store.get(key, prototype)
        if buf is None:
            return None  # missing objects are not cached: a pending image's chunk appears later
        data = buf.to_bytes()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return data

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key.startswith(MUTABLE_PREFIXES):
            return await self._store.get(key, prototype, byte_range)
        data = await self._fetch(key, prototype)
        return None if data is None else prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    def object_size(self, key: str) -> int | None:
        """Size of object ``key`` (fetched into the local copy if needed), ``None`` if it is missing."""
        from zarr.core.buffer import default_buffer_prototype

        data = sync(self._fetch(key, default_buffer_prototype()))
        return None if data is None else len(data)

    def __repr__(self) -> str:
        return f"ReadThroughStore({self._store!r}, local_dir={str(self.local_dir)!r})"


def read_through(store: Any, url: str, root: Path | None) -> Any:
    """``store`` wrapped in a :class:`ReadThroughStore` under ``root`` (unchanged when ``root`` is None)."""
    return store if root is None else ReadThroughStore(store, local_dir=cache_dir_for(url, root))


__all__ = ["ENV", "ReadThroughStore", "cache_dir_for", "default_cache_root", "read_through", "use_cache_root"]
