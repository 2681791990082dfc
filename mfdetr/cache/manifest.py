"""The cache manifest: what a store holds and how it was made (schema ``cache_schemas/v1``).

The manifest is plain JSON data stored as the ``mfdetr_cache`` attribute of the store's root group.
It copies the detector preset, the checkpoint's sha256, the preprocessing, the source annotation
file's sha256, the shapes (K, d, C, C1, level strides, canvases), dtypes and codecs. Two writers may
share a store only if their manifests are equal except ``created_utc``
(:func:`manifest_differences`); a reader states what it expects (:func:`check_expectations`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mfdetr import __version__
from mfdetr.cache.codecs import DEFAULT_PRESET, manifest_codecs
from mfdetr.cache.schema import (
    CURRENT_SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    load_manifest_schema,
    resolve_array_table,
    validate_json,
)
from mfdetr.cache.views import check_views, view_manifest_entry
from mfdetr.contracts import DetectorPreset
from mfdetr.errors import MfdetrError

MANIFEST_ATTR = "mfdetr_cache"
FORMAT = "mfdetr-cache"
C1_STRIDE = 4
#: Fields that may differ between writers of one store.
VOLATILE_FIELDS = ("created_utc",)
#: store file recording where the COCO folder was on the machine that wrote it (a hint for ``--coco``,
#: not part of the store's identity; ``mfdetr.cache.run.write_source_hint``)
SOURCE_HINT = "mfdetr_source.json"
#: Default lossless codec of data arrays: zstd level 1. Measured on float16 maps (benchmarks/bench_cache.py):
#: as small as levels 3/5 and as blosc(zstd, byte/bit shuffle), ~2x faster to encode than level 3.
DEFAULT_CODEC: dict[str, Any] = {"name": "zstd", "level": 1}
#: Checksum of every stored chunk but the commit flags (``mfdetr.cache.store.checksum_codecs``); stores
#: made before it have no ``codecs.checksum`` and are read without.
CHECKSUM: dict[str, Any] = {"name": "crc32c"}


def sha256_file(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def image_ids_sha256(image_ids: Sequence[int]) -> str:
    """sha256 of the image id list as little-endian int64 (identifies the N axis of a store)."""
    return hashlib.sha256(np.asarray(image_ids, dtype="<i8").tobytes()).hexdigest()


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest in canonical JSON (``created_utc`` included): what a training run records as
    "the cache it used". The one manifest hash of the package (the reader and the engine use it)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def tile_for(side: int) -> int:
    """Side of the square inner chunk (tile) of a canvas side: the smallest divisor of ``side`` that is
    at least ``max(side / 7, min(side, 16))`` — about 6-7 tiles per side on big maps, none on small ones.

    A reader that asks for an image's valid region then decodes only the tiles it overlaps, not the
    zero padding (measured: ~2x faster reads of an R50 C1 canvas, same bytes on disk).
    """
    floor = max(side / 7, min(side, 16))
    return next(t for t in range(1, side + 1) if side % t == 0 and t >= floor)


def canvas_for(max_size: int, level_strides: Sequence[int]) -> dict[str, Any]:
    """The fixed canvas of every map for a preprocessing ``max_size``, and its tiles.

    The DETR resize bounds the longer side by ``max_size`` up to integer rounding (it can overshoot by
    a few pixels for very elongated images), so the input canvas is ``max_size`` rounded up to a multiple
    of the coarsest stride (1333 → 1344 for stride 64), square so that both orientations fit. Level
    ``l`` then has exactly ``E / stride_l`` cells and C1 ``E / 4``. Zero padding costs almost nothing
    once compressed (measured in benchmarks/bench_cache.py), and tiles (:func:`tile_for`) keep readers
    from decoding it. An image whose input exceeds the canvas is skipped with a recorded reason.
    """
    coarsest = max(max(level_strides), C1_STRIDE)
    e = -(-max_size // coarsest) * coarsest
    return {
        "input_hw": [e, e],
        "level_hw": [[e // s, e // s] for s in level_strides],
        "c1_hw": [e // C1_STRIDE, e // C1_STRIDE],
        "level_tile": [tile_for(e // s) for s in level_strides],
        "c1_tile": tile_for(e // C1_STRIDE),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def build_manifest(
    *,
    preset: DetectorPreset,
    checkpoint_file: str,
    checkpoint_sha256: str,
    split: str,
    annotation_file: str,
    annotation_sha256: str,
    image_ids: Sequence[int],
    topk: int,
    enc_layers: Sequence[int],
    logits_dtype: str = "float32",
    codec: Mapping[str, Any] | None = None,
    codec_preset: str = DEFAULT_PRESET,
    c1: Mapping[str, Any] | None = None,
    views: Sequence[str] = ("orig",),
) -> dict[str, Any]:
    """The manifest of a new store (validated against the schema).

    Args:
        preset: the detector preset (copied whole).
        checkpoint_file / checkpoint_sha256: checkpoint file name and its sha256.
        split / annotation_file / annotation_sha256: the source COCO split.
        image_ids: the split's image ids in store index order (ascending id).
        topk: K queries kept per image; enc_layers: 1-based encoder layers stored (Table 15).
        codec: the data compressor (default :data:`DEFAULT_CODEC`); codec_preset: the feature codec
            preset (``mfdetr.cache.codecs.PRESETS``), recorded with its filter chain.
        c1: the ``c1`` entry of a ``--c1 recompute`` store (``{"mode": "recompute", "stage0": {...}}``,
            :mod:`mfdetr.cache.stage0`); ``None`` = store C1 (no entry: the manifest of ``--c1 store``).
        views: the image views stored (:mod:`mfdetr.cache.views`); the original view alone writes no
            ``views`` field.
    """
    layers = sorted({int(e) for e in enc_layers})
    if not layers or layers[0] < 1 or layers[-1] > preset.num_encoder_layers:
        raise MfdetrError(
            f"--enc-layers {list(enc_layers)}: detector {preset.name} has encoder layers 1..{preset.num_encoder_layers}"
        )
    if topk < 1:
        raise MfdetrError(f"--topk must be >= 1, got {topk}")
    if preset.num_queries is not None and topk > preset.num_queries:
        raise MfdetrError(f"--topk {topk}: detector {preset.name} runs only {preset.num_queries} queries")
    m = {
        "format": FORMAT,
        "schema_version": CURRENT_SCHEMA_VERSION,
        "mfdetr_version": __version__,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "detector": preset.to_dict(),
        "checkpoint": {"file": Path(checkpoint_file).name, "sha256": checkpoint_sha256},
        "preprocessing": preset.preprocessing.to_dict(),
        "source": {
            "split": split,
            "annotation_file": Path(annotation_file).name,
            "annotation_sha256": annotation_sha256,
        },
        "num_images": len(image_ids),
        "image_ids_sha256": image_ids_sha256(image_ids),
        "topk": int(topk),
        "hidden_dim": preset.hidden_dim,
        "num_classes": preset.num_classes,
        "c1_channels": preset.c1_channels,
        "c1_stride": C1_STRIDE,
        "level_strides": list(preset.level_strides),
        "enc_layers": layers,
        "canvas": canvas_for(preset.preprocessing.max_size, preset.level_strides),
        "dtypes": {"features": "float16", "boxes": "float32", "logits": logits_dtype},
        "codecs": {**manifest_codecs(codec_preset, dict(codec or DEFAULT_CODEC)), "checksum": dict(CHECKSUM)},
        "category_map": list(preset.class_to_category),
        "arrays": [],
    }
    if c1 is not None:
        m["c1"] = dict(c1)
    m.update(view_manifest_entry(views))
    m["arrays"] = [a.name for a in resolve_array_table(m)]
    m = _jsonable(m)
    errs = validate_manifest_data(m)
    if errs:  # a preset that cannot be described is a programming error
        raise ValueError("built manifest does not validate: " + "; ".join(errs))
    return m


def validate_manifest_data(m: Any) -> list[str]:
    """Problems of a manifest: wrong format/unknown version first, then every schema violation."""
    if not isinstance(m, dict):
        return ["manifest is not a JSON object"]
    if m.get("format") != FORMAT:
        return [f"not an mfdetr cache manifest (format={m.get('format')!r})"]
    v = m.get("schema_version")
    if v not in SCHEMA_VERSIONS:
        return [
            f"unknown cache schema version {v!r} (this mfdetr {__version__} reads "
            f"{', '.join(map(str, SCHEMA_VERSIONS))})"
        ]
    errs = validate_json(m, load_manifest_schema(v))
    if not errs:
        if m["num_classes"] != len(m["category_map"]):
            errs.append(f"manifest.category_map: {len(m['category_map'])} entries, num_classes is {m['num_classes']}")
        errs += check_views(m)
        c1 = m.get("c1", {"mode": "store"})
        if (c1["mode"] == "recompute") != ("stage0" in c1):
            errs.append("manifest.c1: a 'recompute' store names its stage0 files, a 'store' one none")
        cv = m["canvas"]
        if not len(cv["level_hw"]) == len(cv["level_tile"]) == len(m["level_strides"]):
            errs.append("manifest.canvas.level_hw/level_tile: one entry per level stride expected")
        tiles = [*zip(cv["level_hw"], cv["level_tile"], strict=False), (cv["c1_hw"], cv["c1_tile"])]
        if any(side % t for hw, t in tiles for side in hw):
            errs.append("manifest.canvas: every tile must divide its canvas side")
    return errs


def manifest_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two manifests differ (``created_utc`` ignored), with both values."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in VOLATILE_FIELDS:
            continue
        path = f"{prefix}{key}"
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += manifest_differences(va, vb, path + ".")
        elif va != vb:
            out.append(f"{path}: {json.dumps(va)[:80]} vs {json.dumps(vb)[:80]}")
    return out


def _get(m: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = m
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return "<missing>"
        cur = cur[part]
    return cur


def check_expectations(m: Mapping[str, Any], expect: Mapping[str, Any] | None, *, where: str) -> None:
    """Raise :class:`MfdetrError` if the manifest differs from what a command expects.

    ``expect`` maps dotted manifest paths to values, e.g. ``{"detector.name": "dino_r50",
    "checkpoint.sha256": "…", "preprocessing": {...}}``. The special key ``"enc_layers"`` means
    "the store holds (at least) these layers".
    """
    for key, want in (expect or {}).items():
        have = _get(m, key)
        if key == "enc_layers":
            missing = sorted(set(int(e) for e in want) - set(have if isinstance(have, list) else []))
            if missing:
                raise MfdetrError(f"cache holds encoder layers {have}, but layers {missing} were asked for", path=where)
            continue
        if _jsonable(want) != have:
            raise MfdetrError(
                f"cache was made with {key}={json.dumps(have)[:100]}, but this command expects "
                f"{json.dumps(_jsonable(want))[:100]}",
                path=where,
            )
