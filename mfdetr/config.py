"""Typed configs from TOML recipes: values only, unknown keys refused, ``section.key=value`` overrides.

A config is a (nested) dataclass. :func:`from_dict` builds it from plain data, refusing unknown keys
and checking types; :func:`load_toml` reads a recipe file; :func:`apply_overrides` applies
command-line overrides such as ``masknet.box_encoder.layers=3``; :func:`to_dict` turns a config back
into plain data (for run records and cache manifests).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mfdetr.errors import MfdetrError

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """A dataclass config (or nested values) as plain dicts/lists/scalars."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except MfdetrError as e:
                errors.append(str(e))
        raise MfdetrError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise MfdetrError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise MfdetrError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list | tuple):
            raise MfdetrError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise MfdetrError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise MfdetrError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MfdetrError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MfdetrError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MfdetrError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MfdetrError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from plain data; unknown keys and wrong types are clear errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise MfdetrError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MfdetrError(f"{where}: {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe; a missing or malformed file is a clear error naming it."""
    p = Path(path)
    if not p.is_file():
        raise MfdetrError("config file not found", path=p)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise MfdetrError(f"malformed TOML: {e}", path=p) from None
    except UnicodeDecodeError as e:
        raise MfdetrError(f"malformed TOML: not UTF-8 text (byte {e.start})", path=p) from None


def parse_value(text: str) -> Any:
    """An override value as TOML (``3``, ``1.5e-4``, ``true``, ``[1, 2]``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested plain data (a new dict is returned)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise MfdetrError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise MfdetrError(f"override {item!r} has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise MfdetrError(f"override {item!r}: {p} is a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(text.strip())
    return out
