"""The versioned cache schema shipped in ``cache_schemas/`` (inside the package as ``mfdetr/_schemas``).

- :func:`load_manifest_schema` / :func:`load_array_table` read ``v{N}/manifest.schema.json`` and
  ``v{N}/arrays.json`` through :mod:`importlib.resources`, so they work from a checkout, a wheel or
  an editable install alike.
- :func:`validate_json` checks a value against those files with ``jsonschema`` (Draft 2020-12) and
  words each violation as one line naming its JSON path.
- :func:`resolve_array_table` turns the symbolic table (``["N", "K", "d"]``) into concrete
  :class:`ArraySpec` records for one manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

SCHEMA_VERSIONS = (1,)
CURRENT_SCHEMA_VERSION = 1
SKIP_REASON_BYTES = 256


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


def _json_path(where: str, path: Iterable[str | int]) -> str:
    return where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _messages(err: ValidationError, where: str) -> list[str]:
    """Lines naming the JSON path and the broken rule (the wording the CLI has always printed)."""
    at, value, rule, limit = _json_path(where, err.absolute_path), err.instance, err.validator, err.validator_value
    if rule == "required":  # one line per missing field (jsonschema reports each on its own, too)
        return [f"{at}: missing required field {k!r}" for k in limit if k not in value]
    if rule == "additionalProperties" and limit is False:
        known = err.schema.get("properties", {})
        return [f"{at}: unexpected field {k!r}" for k in value if k not in known]
    return [_message(err, at)]


def _message(err: ValidationError, at: str) -> str:
    value, rule, limit = err.instance, err.validator, err.validator_value
    if rule == "type":
        types = limit if isinstance(limit, list) else [limit]
        return f"{at}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"
    if rule == "const":
        return f"{at}: must be {limit!r}, got {value!r:.60}"
    if rule == "enum":
        return f"{at}: must be one of {limit}, got {value!r:.60}"
    if rule == "minimum":
        return f"{at}: must be >= {limit}, got {value}"
    if rule == "minLength":
        return f"{at}: must not be empty" if limit == 1 else f"{at}: must have at least {limit} characters"
    if rule == "pattern":
        return f"{at}: {value!r:.60} does not match {limit}"
    if rule in ("minItems", "maxItems"):
        bound = "at least" if rule == "minItems" else "at most"
        return f"{at}: expected {bound} {limit} items, got {len(value)}"
    return f"{at}: {err.message}"


def validate_json(value: Any, schema: dict[str, Any], where: str = "manifest") -> list[str]:
    """Validate ``value`` against the JSON Schema ``schema`` with ``jsonschema``; return the problems.

    Each problem names the JSON path, e.g. ``manifest.canvas.level_hw[0]: expected at most 2 items,
    got 3``. A schema that is not valid JSON Schema raises ``ValueError``.
    """
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"invalid schema at {where}: {e.message}") from None
    out: list[str] = []
    for err in cls(schema).iter_errors(value):
        out += [m for m in _messages(err, where) if m not in out]
    return out


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
        "N": manifest["num_images"],
        "K": manifest["topk"],
        "d": manifest["hidden_dim"],
        "C": manifest["num_classes"],
        "C1": manifest["c1_channels"],
        "L": len(manifest["level_strides"]),
        "H1": canvas["c1_hw"][0],
        "W1": canvas["c1_hw"][1],
        "R": SKIP_REASON_BYTES,
        "T1": canvas["c1_tile"],
    }

    def dims(spec: list[Any], extra: dict[str, int]) -> tuple[int, ...]:
        # a chunk of length N is at least 1 (a store of 0 images still has valid metadata)
        return tuple(int(x) if isinstance(x, int) else max({**sym, **extra}[x], 1 if x == "N" else 0) for x in spec)

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
