"""Creating and validating a cache store on disk (Zarr v3 directory).

Layout (``cache_schemas/v1``): a root group whose attribute ``mfdetr_cache`` is the manifest, and one
array per entry of the resolved array table, chunked one image per chunk along N, so every image owns
its chunk files and concurrent writers (shards) never touch the same file. ``image_ids`` is written
whole when the store is created; ``commit[i]`` is written last for every image. Every chunk but the
commit flags ends in a crc32c checksum (:func:`checksum_codecs`, ``manifest.codecs.checksum``).

Race-free creation (several shard processes may start at once): the creator builds the complete
empty store (metadata + ``image_ids``) in a private temporary directory next to the target and
``rename``s it into place. ``rename`` of a directory is atomic and fails when the target already
exists and is not empty, so exactly one creator wins; the others discard their copy, open the
winner's store and require an identical manifest (:func:`open_for_writing`).

A store may also live on object storage (any fsspec URL, e.g. ``s3://bucket/prefix``): paths are then
:class:`~mfdetr.cache.location.RemotePath` and creation is claimed by an exclusive-create object instead
of a rename (the design is in :mod:`mfdetr.cache.location`).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# the store's files, re-exported: imported from here by the cache's modules and its users
from mfdetr.cache.chunk_files import chunk_path as chunk_path
from mfdetr.cache.chunk_files import human_bytes as human_bytes
from mfdetr.cache.chunk_files import read_commit_flags as read_commit_flags
from mfdetr.cache.chunk_files import stored_bytes as stored_bytes
from mfdetr.cache.codecs import feature_filters, filters_metadata_of, preset_of, with_codec_defaults
from mfdetr.cache.location import (
    CREATOR_OBJECT,
    RemotePath,
    claim_creation,
    remote_error,
    storage_problem,
    store_location,
    wait_for_manifest,
    zarr_target,
)
from mfdetr.cache.manifest import MANIFEST_ATTR, image_ids_sha256, manifest_differences, validate_manifest_data
from mfdetr.cache.schema import ArraySpec, resolve_array_table
from mfdetr.errors import MfdetrError


def make_compressors(codec: dict[str, Any]) -> tuple[Any, ...]:
    """Zarr v3 compressors of a manifest codec entry (``{"name": "zstd", "level": 1}`` …)."""
    name = codec["name"]
    if name == "none":
        return ()
    if name == "zstd":
        return (ZstdCodec(level=int(codec.get("level", 1))),)
    if name == "blosc":
        return (
            BloscCodec(
                cname=codec.get("cname", "zstd"),
                clevel=int(codec.get("level", 1)),
                shuffle=codec.get("shuffle", "shuffle"),
            ),
        )
    raise MfdetrError(f"unknown cache codec {name!r}")


def checksum_codecs(manifest: dict[str, Any], name: str) -> tuple[Any, ...]:
    """Checksum codecs that close array ``name``'s bytes-to-bytes chain (after compression; for a sharded
    array, of every tile: the shard index carries its own crc32c), so a truncated or altered chunk
    fails to decode instead of reading as other numbers.

    ``manifest.codecs.checksum`` records it (``{"name": "crc32c"}``); stores made before it have none
    and stay readable. ``commit`` never has one: its 1-byte chunks are read raw
    (:func:`read_commit_flags`), and a flag outside 0/1/2 is reported as damage anyway.
    """
    from mfdetr.cache.views import base_name

    ck = manifest["codecs"].get("checksum")
    if ck is None or base_name(name) == "commit":  # every view's commit flags
        return ()
    if ck["name"] == "crc32c":
        return (Crc32cCodec(),)
    raise MfdetrError(f"unknown cache checksum codec {ck['name']!r}")


def adopt_checksum_setting(have: dict[str, Any], planned: dict[str, Any]) -> dict[str, Any]:
    """``planned`` with the existing store's checksum setting, so a store written before checksums
    existed resumes (and is repaired) in its own format."""
    if "checksum" in have.get("codecs", {}) or "checksum" not in planned["codecs"]:
        return planned
    codecs = {k: v for k, v in planned["codecs"].items() if k != "checksum"}
    return {**planned, "codecs": codecs}


def _codec_of(spec: ArraySpec, manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["codecs"]["data"] if spec.codec in ("data", "features") else {"name": "none"}


def _filters_of(spec: ArraySpec, manifest: dict[str, Any]) -> tuple[Any, ...]:
    """The codec preset's filters for feature arrays (``mfdetr.cache.codecs``), none elsewhere."""
    return feature_filters(manifest) if spec.codec == "features" else ()


def _describe_compressors(arr: zarr.Array) -> dict[str, Any]:
    comps = [c for c in arr.compressors if not isinstance(c, Crc32cCodec)]
    if not comps:
        return {"name": "none"}
    c = comps[0]
    if isinstance(c, ZstdCodec):
        return {"name": "zstd", "level": c.level}
    if isinstance(c, BloscCodec):
        return {"name": "blosc", "cname": str(c.cname.value), "level": c.clevel, "shuffle": str(c.shuffle.value)}
    return {"name": type(c).__name__}


def _build(
    path: Path | RemotePath,
    manifest: dict[str, Any],
    image_ids: np.ndarray,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    remote = isinstance(path, RemotePath)  # remote: never delete anything (another creator may be writing)
    root = zarr.open_group(zarr_target(path, read_only=False), mode="a" if remote else "w", zarr_format=3)
    for rel, data in (extra_files or {}).items():  # e.g. the stage 0 of a --c1 recompute store
        if isinstance(path, Path):
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        have = set(root.array_keys()) if remote else set()
    for spec in resolve_array_table(manifest):
        if spec.name in have:  # left by a creator that died: compared with the schema when opened
            continue
        layout = {"shards": spec.chunks, "chunks": spec.inner_chunks} if spec.inner_chunks else {"chunks": spec.chunks}
        arr = root.create_array(
            spec.name,
            shape=spec.shape,
            dtype=spec.dtype,
            **layout,
            filters=_filters_of(spec, manifest),
            compressors=make_compressors(_codec_of(spec, manifest)) + checksum_codecs(manifest, spec.name),
            fill_value=0,
        )
        if spec.name == "image_ids" and len(image_ids):
            arr[:] = image_ids
    # the manifest goes last: a directory without it is never mistaken for a store
    root.attrs[MANIFEST_ATTR] = manifest


def open_for_writing(
    path: str | Path, manifest: dict[str, Any], image_ids: np.ndarray, extra_files: dict[str, bytes] | None = None
) -> zarr.Group:
    """Create the store at ``path`` (atomically) or open the existing one with the same manifest.

    ``extra_files`` (store-relative path → bytes) are written into a new store before it appears; an
    existing store keeps its own (their sha256 are part of the manifest that must match).

    Raises :class:`MfdetrError` if ``path`` holds something else or a store made with a different
    manifest (listing the differences).
    """
    path = store_location(path)
    if isinstance(path, RemotePath):
        return _open_remote_for_writing(path, manifest, image_ids, extra_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if not exists:
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, manifest, image_ids, extra_files)
            try:
                os.rename(tmp, path)  # atomic; fails if another writer created the store first
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise MfdetrError(f"disk full while creating the store ({e.strerror})", path=path) from None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    root, have = _open_root(path)
    _check_same_manifest(root, have, manifest, path)
    return zarr.open_group(str(path), mode="r+", zarr_format=3)


def _check_same_manifest(
    root: zarr.Group, have: dict[str, Any], manifest: dict[str, Any], path: Path | RemotePath
) -> None:
    manifest = adopt_checksum_setting(have, manifest)
    diffs = manifest_differences(with_codec_defaults(have), manifest)
    if diffs:
        raise MfdetrError(
            "exists and was made with different settings (store vs this run): "
            + "; ".join(diffs[:4])
            + ("; ..." if len(diffs) > 4 else "")
            + " (rerun with the same options to resume, or choose another --out)",
            path=path,
        )
    validate_store(root, have, path=path)


def _open_remote_for_writing(
    path: RemotePath, manifest: dict[str, Any], image_ids: np.ndarray, extra_files: dict[str, bytes] | None
) -> zarr.Group:
    """:func:`open_for_writing` on object storage: creation claimed by an exclusive-create object."""
    with _storage_errors(path, "create or open the cache store"):
        if not _remote_has_store(path):
            if claim_creation(path):
                if not _remote_has_store(path):
                    _build(path, manifest, image_ids, extra_files)
                (path / CREATOR_OBJECT).unlink(missing_ok=True)  # the manifest now tells the store exists
            else:
                wait_for_manifest(path, lambda: _remote_has_store(path))
        root, have = _open_root(path)
        _check_same_manifest(root, have, manifest, path)
        return zarr.open_group(zarr_target(path, read_only=False), mode="r+", zarr_format=3)


@contextmanager
def _storage_errors(path: RemotePath, action: str) -> Iterator[None]:
    """Re-raise a storage problem (credentials, network, permissions...) of the block as one
    :class:`MfdetrError` line saying what could not be done (``action``); anything else passes unchanged."""
    try:
        yield
    except MfdetrError:
        raise
    except Exception as e:
        if storage_problem(e) is None:
            raise
        raise remote_error(path, e, action) from None


def _remote_has_store(path: RemotePath) -> bool:
    """True when the store's root metadata holds a manifest (written last by the creator)."""
    try:
        meta = (path / "zarr.json").read_bytes()
    except FileNotFoundError:
        return False
    return MANIFEST_ATTR.encode() in meta


def _missing_remote(path: RemotePath) -> MfdetrError:
    bucket = path.path.split("/", 1)[0]
    try:
        bucket_ok = bool(path.fs.exists(bucket))
    except Exception:  # noqa: BLE001 - any failure here only changes the wording
        bucket_ok = True
    if not bucket_ok:
        return MfdetrError(f"cache store not found: bucket '{bucket}' does not exist or is not accessible", path=path)
    return MfdetrError("cache store not found (no zarr.json: expected a store made by `mfdetr cache`)", path=path)


def _open_root(path: Path | RemotePath) -> tuple[zarr.Group, dict[str, Any]]:
    if isinstance(path, RemotePath):
        with _storage_errors(path, "open the cache store"):
            if not (path / "zarr.json").exists():
                raise _missing_remote(path)
    elif not path.is_dir():
        raise MfdetrError("cache store not found (expected a directory made by `mfdetr cache`)", path=path)
    try:
        root = zarr.open_group(zarr_target(path, read_only=True), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is the same user-facing problem
        if isinstance(path, RemotePath) and storage_problem(e) is not None:
            raise remote_error(path, e, "open the cache store") from None
        raise MfdetrError(f"not a Zarr v3 cache store ({type(e).__name__}: {str(e)[:120]})", path=path) from None
    manifest = root.attrs.get(MANIFEST_ATTR)
    if manifest is None:
        raise MfdetrError(f"not an mfdetr cache store (no '{MANIFEST_ATTR}' manifest attribute)", path=path)
    errs = validate_manifest_data(manifest)
    if errs:
        raise MfdetrError("invalid manifest: " + "; ".join(errs[:3]) + (" ..." if len(errs) > 3 else ""), path=path)
    return root, dict(manifest)


def validate_store(root: zarr.Group, manifest: dict[str, Any], *, path: str | Path) -> None:
    """Check every array of the manifest exists with the schema's shape, dtype, chunks and codec."""
    with warnings.catch_warnings():  # zarr warns about unrecognised folders; we report them ourselves
        warnings.simplefilter("ignore")
        members = set(root.array_keys())
    for spec in resolve_array_table(manifest):
        if spec.name not in members:
            raise MfdetrError(f"array '{spec.name}' is missing", path=path)
        arr = root[spec.name]
        assert isinstance(arr, zarr.Array)
        got = (
            tuple(arr.shape),
            str(arr.dtype),
            tuple(arr.shards or arr.chunks),
            tuple(arr.chunks) if arr.shards else None,
        )
        want = (spec.shape, spec.dtype, spec.chunks, spec.inner_chunks)
        if got != want:
            raise MfdetrError(
                f"array '{spec.name}' is (shape, dtype, chunks, inner chunks)={got}, the schema says {want}", path=path
            )
        codec = _describe_compressors(arr)
        want_codec = _codec_of(spec, manifest)
        if codec["name"] != want_codec["name"] or codec.get("level") != want_codec.get("level"):
            raise MfdetrError(f"array '{spec.name}' uses codec {codec}, the manifest says {want_codec}", path=path)
        filters = filters_metadata_of(arr)
        feats = spec.codec == "features"
        want_filters = preset_of(manifest).filter_metadata() if feats else []
        if filters != want_filters or (feats and filters != manifest["codecs"].get("feature_filters", [])):
            raise MfdetrError(
                f"array '{spec.name}' has filters {filters}, the manifest's codec preset "
                f"{manifest['codecs'].get('preset', 'lossless')!r} says {want_filters}",
                path=path,
            )
        has_ck = any(isinstance(c, Crc32cCodec) for c in arr.compressors)
        if has_ck != bool(checksum_codecs(manifest, spec.name)):
            raise MfdetrError(
                f"array '{spec.name}' {'has' if has_ck else 'lacks'} a crc32c checksum, the manifest "
                f"says codecs.checksum={manifest['codecs'].get('checksum')}",
                path=path,
            )
    extra = members - set(manifest["arrays"])
    if extra:
        raise MfdetrError(f"unexpected arrays {sorted(extra)} (not in the manifest)", path=path)
    if manifest["arrays"] != [s.name for s in resolve_array_table(manifest)]:
        raise MfdetrError("manifest.arrays does not match the schema's array table", path=path)
    try:
        ids = root["image_ids"][:]
    except Exception as e:  # noqa: BLE001 - a checksum or decoder failure of the one image_ids chunk
        raise MfdetrError(
            f"array 'image_ids' cannot be decoded, truncated or altered ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:120]})",
            path=path,
        ) from None
    if image_ids_sha256(ids.tolist()) != manifest["image_ids_sha256"]:
        raise MfdetrError("image_ids do not match manifest.image_ids_sha256", path=path)


def open_validated(path: str | Path, *, mode: str = "r") -> tuple[zarr.Group, dict[str, Any]]:
    """Open an existing store, validate manifest and arrays; return ``(root group, manifest)``."""
    path = store_location(path)
    root, manifest = _open_root(path)
    validate_store(root, manifest, path=path)
    if mode != "r":
        root = zarr.open_group(zarr_target(path, read_only=False), mode=mode, zarr_format=3)
    return root, manifest
