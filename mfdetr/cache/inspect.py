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
from mfdetr.cache.store import _describe_compressors, human_bytes as _human, stored_bytes
from mfdetr.cache.verify import find_damaged
from mfdetr.cache.writer import COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED


def inspect_store(path: str | Path, *, max_skips: int = 20, verify: bool = False,
                  progress: bool = False) -> tuple[list[str], dict[str, Any]]:
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
    m = store.manifest
    flags = store.commit_flags()
    bar = tqdm(total=len(flags), unit="img", desc="verify", disable=not (verify and progress), file=sys.stderr)
    damage = find_damaged(store, full=verify, progress=bar.update)
    bar.close()
    flag_done, skipped, pending = (int((flags == v).sum()) for v in (COMMIT_DONE, COMMIT_SKIPPED, COMMIT_PENDING))
    done = flag_done - sum(1 for d in damage if d.array != "commit")
    status = f"{len(damage)} DAMAGED image(s)" if damage else "valid"
    lines = [f"cache {store.path}: {status} (schema v{m['schema_version']}, format {m['format']}, "
             f"checksums {'crc32c' if m['codecs'].get('checksum') else 'none'})", "manifest:"]
    for key, value in m.items():
        if key in ("detector", "category_map", "arrays"):
            continue
        lines.append(f"  {key}: {json.dumps(value)}")
    det = m["detector"]
    lines.append(f"  detector: {det['name']} (family {det['family']}, {det['num_classes']} classes, "
                 f"{det['num_encoder_layers']} encoder layers); category_map: {len(m['category_map'])} slots")
    checked = ("every committed image decoded and checked" if verify
               else "commit flags and chunk files checked; --verify decodes every image")
    lines.append(f"completeness: {done}/{len(flags)} done, {skipped} skipped, {pending} pending, "
                 f"{len(damage)} damaged ({checked})")
    for d in damage[:max_skips]:
        lines.append(f"  damaged {d.describe()}")
    if len(damage) > max_skips:
        lines.append(f"  ... {len(damage) - max_skips} more damaged")
    skips = store.skipped()
    for index, image_id, reason in skips[:max_skips]:
        lines.append(f"  skipped index {index} (image id {image_id}): {reason}")
    if len(skips) > max_skips:
        lines.append(f"  ... {len(skips) - max_skips} more skipped")
    written = flag_done + skipped
    arrays: dict[str, Any] = {}
    lines.append(f"arrays (stored bytes vs raw bytes of the {written} written chunks):")
    total = 0
    for name in m["arrays"]:
        arr = store._arrays[name]
        sb = stored_bytes(store.path, name) - file_size(store.path / name / "zarr.json")
        unit = tuple(arr.shards or arr.chunks)  # per-image file: a chunk, or a shard of tiles
        tiles = tuple(arr.chunks) if arr.shards else None
        per_chunk = int(np.prod(unit)) * arr.dtype.itemsize
        n_chunks = 1 if name == "image_ids" else (skipped if name == "skip_reason" else
                                                  written if name == "commit" else flag_done)
        raw = per_chunk * n_chunks
        total += sb
        codec = _describe_compressors(arr)
        filters = filters_metadata_of(arr)
        label = "+".join([f["name"].removeprefix("numcodecs.") for f in filters] + [codec["name"]])
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(unit),
                        "tiles": list(tiles) if tiles else None, "codec": codec, "filters": filters,
                        "stored_bytes": sb, "raw_bytes_written": raw}
        ratio = f"{raw / sb:5.2f}x" if sb else "   - "
        layout = f"chunks {unit}" + (f" tiles {tiles[-2]}x{tiles[-1]}" if tiles else "")
        lines.append(f"  {name:22s} {str(tuple(arr.shape)):24s} {str(arr.dtype):8s} {layout:38s} "
                     f"{label:5s} {_human(sb):>10s} / {_human(raw):>10s} {ratio}")
    partial = 0 if isinstance(store.path, RemotePath) else sum(  # object stores have no temporaries
        1 for _d, _s, files in os.walk(store.path) for f in files if f.endswith(".partial"))
    lines.append(f"bytes on disk: {_human(stored_bytes(store.path))}"
                 + (f"; {_human(total / flag_done)}/image" if flag_done else ""))
    if partial:
        lines.append(f"note: {partial} leftover '.partial' temporary files from interrupted writers "
                     "(harmless; not part of any image)")
    facts = {"done": done, "skipped": skipped, "pending": pending, "damaged": len(damage), "damage": damage,
             "verified": verify, "num_images": len(flags), "arrays": arrays,
             "partial_files": partial, "skips": skips}
    return lines, facts
