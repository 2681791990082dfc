"""``mfdetr inspect CACHE``: validate a store and describe it (manifest, completeness, arrays, bytes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mfdetr.cache.codecs import filters_metadata_of
from mfdetr.cache.location import RemotePath, file_size
from mfdetr.cache.reader import CacheStore
from mfdetr.cache.chunk_files import human_bytes as _human, stored_bytes
from mfdetr.cache.store import _describe_compressors
from mfdetr.cache.verify import find_damaged
from mfdetr.cache.views import base_name, combined_commit, view_array_name
from mfdetr.cache.writer import COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED


def inspect_store(
    path: str | Path, *, max_skips: int = 20, verify: bool = False, progress: bool = False
) -> tuple[list[str], dict[str, Any]]:
    """Validate the store at ``path`` (raises :class:`MfdetrError` if invalid) and describe it.

    Damaged images (:func:`~mfdetr.cache.verify.find_damaged`): a commit flag outside 0/1/2, or a
    committed image with a missing or empty chunk file; with ``verify`` every committed image is also
    decoded whole (checksums, decoder, finite floats). ``done + skipped + pending + damaged`` is always
    the image count (a damaged committed image counts as damaged, not done).

    Returns ``(lines to print, facts)``; ``facts`` holds the same numbers for programs and tests:
    ``done``, ``skipped``, ``pending``, ``damaged``, ``damage`` (list of
    :class:`~mfdetr.cache.verify.Damage`), ``verified``, ``num_images``, ``arrays`` ({name: {shape, dtype,
    chunks, tiles, codec, filters, stored_bytes, raw_bytes_written}}), ``partial_files`` (leftover
    temporaries of killed writers).
    """
    store = CacheStore.open(path)
    views = store.views
    view_flags, view_damage = _check_views(store, verify=verify, progress=progress)
    per_view = {v: _counts(view_flags[v], view_damage[v]) for v in views}
    # an image counts once: done when every view is done, damaged when any view is
    damage = [d for v in views for d in view_damage[v]]
    flags = combined_commit(list(view_flags.values()))
    damaged_idx = np.zeros(len(store), dtype=bool)
    damaged_idx[[d.index for d in damage]] = True
    done, skipped, pending = (
        int(((flags == f) & ~damaged_idx).sum()) for f in (COMMIT_DONE, COMMIT_SKIPPED, COMMIT_PENDING)
    )
    flag_done = int((flags == COMMIT_DONE).sum())
    status = f"{len(damage)} DAMAGED image(s)" if damage else "valid"
    lines = _manifest_lines(store, status)
    checked = (
        "every committed image decoded and checked"
        if verify
        else "commit flags and chunk files checked; --verify decodes every image"
    )
    lines.append(
        f"completeness: {done}/{len(flags)} done, {skipped} skipped, {pending} pending, "
        f"{int(damaged_idx.sum())} damaged ({checked})"
    )
    if len(views) > 1:
        for v, c in per_view.items():
            lines.append(
                f"  view {v}: {c['done']} done, {c['skipped']} skipped, {c['pending']} pending, {c['damaged']} damaged"
            )
    skips = store.skipped()
    lines += _damage_and_skip_lines(damage, skips, max_skips)
    written = flag_done + skipped
    lines.append(f"arrays (stored bytes vs raw bytes of the {written} written chunks):")
    arrays, total = _arrays(store, view_flags, lines)
    partial = _partial_files(store)
    lines.append(
        f"bytes on disk: {_human(stored_bytes(store.path))}"
        + (f"; {_human(total / flag_done)}/image" if flag_done else "")
    )
    if partial:
        lines.append(
            f"note: {partial} leftover '.partial' temporary files from interrupted writers "
            "(harmless; not part of any image)"
        )
    facts = {
        "done": done,
        "skipped": skipped,
        "pending": pending,
        "damaged": int(damaged_idx.sum()),
        "damage": damage,
        "verified": verify,
        "num_images": len(flags),
        "arrays": arrays,
        "partial_files": partial,
        "skips": skips,
        "views": per_view,
    }
    return lines, facts


def _manifest_lines(store: CacheStore, status: str) -> list[str]:
    """The report's first line and its manifest section (one line per key, the detector summarised)."""
    m = store.manifest
    lines = [
        f"cache {store.path}: {status} (schema v{m['schema_version']}, format {m['format']}, "
        f"checksums {'crc32c' if m['codecs'].get('checksum') else 'none'})",
        "manifest:",
    ]
    for key, value in m.items():
        if key in ("detector", "category_map", "arrays"):
            continue
        lines.append(f"  {key}: {json.dumps(value)}")
    det = m["detector"]
    lines.append(
        f"  detector: {det['name']} (family {det['family']}, {det['num_classes']} classes, "
        f"{det['num_encoder_layers']} encoder layers); category_map: {len(m['category_map'])} slots"
    )
    return lines


def _damage_and_skip_lines(damage: list[Any], skips: list[tuple[int, int, str]], max_skips: int) -> list[str]:
    """One line per damaged and per skipped image, at most ``max_skips`` of each (then how many more)."""
    lines = [f"  damaged {d.describe()}" for d in damage[:max_skips]]
    if len(damage) > max_skips:
        lines.append(f"  ... {len(damage) - max_skips} more damaged")
    for index, image_id, reason in skips[:max_skips]:
        lines.append(f"  skipped index {index} (image id {image_id}): {reason}")
    if len(skips) > max_skips:
        lines.append(f"  ... {len(skips) - max_skips} more skipped")
    return lines


def _partial_files(store: CacheStore) -> int:
    """How many leftover ``.partial`` temporaries of killed writers the store holds (object stores have none)."""
    if isinstance(store.path, RemotePath):
        return 0
    return sum(1 for _d, _s, files in os.walk(store.path) for f in files if f.endswith(".partial"))


def _arrays(store: CacheStore, view_flags: dict[str, np.ndarray], lines: list[str]) -> tuple[dict[str, Any], int]:
    """Every array's shape, layout, codec and stored vs raw bytes of its written chunks (one line each
    appended to ``lines``); returns ``(facts per array, stored bytes of them all)``."""
    views = store.views
    arrays: dict[str, Any] = {}
    total = 0
    for name in store.manifest["arrays"]:
        arr = store.root[name]
        vflags = view_flags[next((v for v in views if view_array_name(v, base_name(name)) == name), views[0])]
        v_done, v_skipped = int((vflags == COMMIT_DONE).sum()), int((vflags == COMMIT_SKIPPED).sum())
        sb = stored_bytes(store.path, name) - file_size(store.path / name / "zarr.json")
        unit = tuple(arr.shards or arr.chunks)  # per-image file: a chunk, or a shard of tiles
        tiles = tuple(arr.chunks) if arr.shards else None
        per_chunk = int(np.prod(unit)) * arr.dtype.itemsize
        base = base_name(name)
        n_chunks = (
            1
            if name == "image_ids"
            else (v_skipped if base == "skip_reason" else v_done + v_skipped if base == "commit" else v_done)
        )
        raw = per_chunk * n_chunks
        total += sb
        codec = _describe_compressors(arr)
        filters = filters_metadata_of(arr)
        label = "+".join([f["name"].removeprefix("numcodecs.") for f in filters] + [codec["name"]])
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(unit),
            "tiles": list(tiles) if tiles else None,
            "codec": codec,
            "filters": filters,
            "stored_bytes": sb,
            "raw_bytes_written": raw,
        }
        ratio = f"{raw / sb:5.2f}x" if sb else "   - "
        layout = f"chunks {unit}" + (f" tiles {tiles[-2]}x{tiles[-1]}" if tiles else "")
        lines.append(
            f"  {name:22s} {str(tuple(arr.shape)):24s} {str(arr.dtype):8s} {layout:38s} "
            f"{label:5s} {_human(sb):>10s} / {_human(raw):>10s} {ratio}"
        )
    return arrays, total


def _check_views(
    store: CacheStore, *, verify: bool, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, list[Any]]]:
    """Every view's commit flags and damaged images (:func:`~mfdetr.cache.verify.find_damaged`)."""
    flags = {v: store.for_view(v).commit_flags() for v in store.views}
    bar = tqdm(
        total=len(store) * len(store.views),
        unit="img",
        desc="verify",
        disable=not (verify and progress),
        file=sys.stderr,
    )
    damage = {v: find_damaged(store.for_view(v), full=verify, progress=bar.update) for v in store.views}
    bar.close()
    return flags, damage


def _counts(flags: np.ndarray, damage: list[Any]) -> dict[str, int]:
    """One view's done/skipped/pending/damaged image counts (they sum to the image count)."""
    hit = np.zeros(len(flags), dtype=bool)
    hit[[d.index for d in damage]] = True
    return {
        "done": int(((flags == COMMIT_DONE) & ~hit).sum()),
        "skipped": int(((flags == COMMIT_SKIPPED) & ~hit).sum()),
        "pending": int(((flags == COMMIT_PENDING) & ~hit).sum()),
        "damaged": int(hit.sum()),
    }
