"""The versioned cache schema shipped in ``cache_schemas/`` (inside the package as ``mfdetr/_schemas``).

- :func:`load_manifest_schema` / :func:`load_array_table` read ``v{N}/manifest.schema.json`` and
  ``v{N}/arrays.json`` through :mod:`importlib.resources`, so they work from a checkout, a wheel or
  an editable install alike.
- :func:`validate_json` checks a value against the JSON-Schema subset those files use (``type``,
  ``properties``, ``required``, ``additionalProperties``, ``items``, ``minItems``/``maxItems``,
  ``enum``, ``const``, ``minimum``, ``minLength``, ``pattern``). It is deliberately small so that
  ``jsonschema`` need not become a dependency; a keyword outside the subset is refused (so the
  schema cannot silently say more than is checked).
- :func:`resolve_array_table` turns the symbolic table (``["N", "K", "d"]``) into concrete
  :class:`ArraySpec` records for one manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_VERSIONS = (1,)
CURRENT_SCHEMA_VERSION = 1
SKIP_REASON_BYTES = 256

_ANNOTATION_KEYS = {"$schema", "$id", "title", "description"}
_CHECKED_KEYS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                 "enum", "const", "minimum", "minLength", "pattern"}


def _schema_dir(version: int) -> Any:
    return resources.files("mfdetr") / "_schemas" / f"v{version}"


@cache
def _load(version: int, name: str) -> dict[str, Any]:
    if version not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown cache schema version {version}")
    return json.loads((_schema_dir(version) / name).read_text(encoding="utf-8"))


def load_manifest_schema(version: int = CURRENT_SCHEMA_VERSION) -> dict[str, Any]:
    """The manifest JSON Schema of ``version``."""
    return _load(version, "manifest.schema.json")


def load_array_table(version: int = CURRENT_SCHEMA_VERSION) -> list[dict[str, Any]]:
    """The symbolic array table of ``version`` (list of ``{name, shape, dtype, chunks, codec, meaning}``)."""
    return list(_load(version, "arrays.json")["arrays"])


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, tp: str) -> bool:
    if tp == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if tp == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp not in _TYPES:
        raise ValueError(f"schema uses unsupported type {tp!r}")
    return isinstance(value, _TYPES[tp])


def validate_json(value: Any, schema: dict[str, Any], where: str = "manifest") -> list[str]:
    """Validate ``value`` against ``schema`` (the subset above); return the list of problems.

    Each problem names the JSON path, e.g. ``manifest.canvas.level_hw[0]: expected 2 items, got 3``.
    """
    unknown = set(schema) - _CHECKED_KEYS - _ANNOTATION_KEYS
    if unknown:
        raise ValueError(f"schema at {where} uses unsupported keywords {sorted(unknown)}")
    errs: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        errs.append(f"{where}: must be {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: must be one of {schema['enum']}, got {value!r:.60}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        errs.append(f"{where}: must be >= {schema['minimum']}, got {value}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errs.append(f"{where}: must not be empty")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{where}: {value!r:.60} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{where}: expected at least {schema['minItems']} items, got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{where}: expected at most {schema['maxItems']} items, got {len(value)}")
        if "items" in schema:
            for i, v in enumerate(value):
                errs += validate_json(v, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{where}: missing required field {key!r}")
        for key, v in value.items():
            if key in props:
                errs += validate_json(v, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errs.append(f"{where}: unexpected field {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += validate_json(v, schema["additionalProperties"], f"{where}.{key}")
    return errs


@dataclass(frozen=True)
class ArraySpec:
    """One concrete array of a store: name, shape, dtype, chunk shape, codec key and meaning."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]  # the per-image storage unit (a plain chunk, or a shard when inner_chunks)
    codec: str  # "data" or "none"
    meaning: str
    inner_chunks: tuple[int, ...] | None = None  # tiles of a sharded array, compressed one by one


def resolve_array_table(manifest: dict[str, Any]) -> list[ArraySpec]:
    """Concrete :class:`ArraySpec` list of the store described by ``manifest`` (schema v1 rules): the
    original view's arrays, then every extra view's copies (:mod:`mfdetr.cache.views`)."""
    from mfdetr.cache.views import expand_views, store_views

    return expand_views(base_array_table(manifest), store_views(manifest))


def base_array_table(manifest: dict[str, Any]) -> list[ArraySpec]:
    """The arrays of one view (named as in the original view), ``image_ids`` included."""
    table = load_array_table(int(manifest["schema_version"]))
    canvas = manifest["canvas"]
    sym: dict[str, int] = {
        "N": manifest["num_images"], "K": manifest["topk"], "d": manifest["hidden_dim"],
        "C": manifest["num_classes"], "C1": manifest["c1_channels"], "L": len(manifest["level_strides"]),
        "H1": canvas["c1_hw"][0], "W1": canvas["c1_hw"][1], "R": SKIP_REASON_BYTES, "T1": canvas["c1_tile"],
    }

    def dims(spec: list[Any], extra: dict[str, int]) -> tuple[int, ...]:
        # a chunk of length N is at least 1 (a store of 0 images still has valid metadata)
        return tuple(int(x) if isinstance(x, int) else max({**sym, **extra}[x], 1 if x == "N" else 0)
                     for x in spec)

    def _spec(row: dict[str, Any], name: str, dtype: str, extra: dict[str, int]) -> ArraySpec:
        shape = (manifest["num_images"], *dims(row["shape"], extra)[1:])
        chunks = dims(row["chunks"], extra)
        inner = dims(row["inner_chunks"], extra) if row.get("inner_chunks") else None
        if inner == chunks:  # a map no bigger than one tile: a plain chunk
            inner = None
        return ArraySpec(name, shape, dtype, chunks, row["codec"], row["meaning"], inner)

    mode = "c1_" + c1_mode(manifest)
    out: list[ArraySpec] = []
    for row in table:
        if row.get("when", mode) != mode:
            continue
        dtype = manifest["dtypes"]["logits"] if row["dtype"] == "logits" else row["dtype"]
        if "{e}" in row["name"]:
            for e in manifest["enc_layers"]:
                for lvl, (h, w) in enumerate(canvas["level_hw"]):
                    extra = {"Hl": h, "Wl": w, "Tl": canvas["level_tile"][lvl]}
                    out.append(_spec(row, row["name"].format(e=e, l=lvl), dtype, extra))
        else:
            out.append(_spec(row, row["name"], dtype, {}))
    return out


def c1_mode(manifest: dict[str, Any]) -> str:
    """``"store"`` (the ``c1`` array; also when the manifest has no ``c1`` entry) or ``"recompute"``."""
    return str(manifest.get("c1", {}).get("mode", "store"))


def enc_array_name(layer: int, level: int) -> str:
    """Name of the stored encoder map of ``layer`` (1-based) at ``level`` (0-based)."""
    return f"enc_layer{layer}_level{level}"
