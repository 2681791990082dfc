"""Detector presets as data files (``mfdetr detectors save``): JSON or TOML with ``name``, ``family``
(``dino`` / ``hdetr``) and ``arch`` (the family config's fields), optionally ``class_to_category`` (the
category id of each class slot; default slot i = id i) and ``preprocessing`` (``short_side``,
``max_size``, ``mean``, ``std``; default 800/1333, ImageNet). Loading one registers it by its name, so
``--detector FILE`` works wherever a preset name does."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfdetr.contracts import DetectorPreset, Preprocessing
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write_text

FAMILIES = ("dino", "hdetr")


def preset_record(preset: DetectorPreset) -> dict[str, Any]:
    """What a preset file holds."""
    return {
        "name": preset.name,
        "family": preset.family,
        "arch": json.loads(json.dumps(dict(preset.arch))),
        "class_to_category": list(preset.class_to_category),
        "preprocessing": preset.preprocessing.to_dict(),
    }


def save_preset_file(preset: DetectorPreset, path: Path, *, name: str | None = None) -> Path:
    rec = preset_record(preset)
    if name:
        rec["name"] = name
    if path.suffix != ".json":
        raise MfdetrError("preset files are written as JSON: give a .json path", path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=2) + "\n", what="preset file")
    return path


def _config(family: str, arch: Mapping[str, Any], path: Path) -> Any:
    if family == "dino":
        from mfdetr.detectors.dino.config import DinoConfig as cls
    elif family == "hdetr":
        from mfdetr.detectors.hdetr.config import HDetrConfig as cls
    else:
        raise MfdetrError(f"family {family!r} unknown (known: {', '.join(FAMILIES)})", path=path)
    try:
        return cls.from_dict(arch)
    except MfdetrError as e:
        raise MfdetrError(f"bad arch: {e}", path=path) from None
    except (TypeError, KeyError, ValueError) as e:
        raise MfdetrError(f"bad arch: {type(e).__name__}: {e}", path=path) from None


def load_preset_file(path: Path) -> tuple[DetectorPreset, str, Any]:
    """(preset, family, config) of a preset file."""
    if not path.is_file():
        raise MfdetrError("detector preset file not found", path=path)
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MfdetrError(f"not a preset file: {type(e).__name__}: {str(e).splitlines()[0]}", path=path) from None
    if not isinstance(data, dict) or not {"name", "family", "arch"} <= set(data):
        raise MfdetrError("a preset file needs name, family and arch", path=path)
    unknown = set(data) - {"name", "family", "arch", "class_to_category", "preprocessing"}
    if unknown:
        raise MfdetrError(f"unknown preset file keys: {sorted(unknown)}", path=path)
    import dataclasses

    from mfdetr.detectors.auto import arch_preset

    family = str(data["family"])
    cfg = _config(family, data["arch"], path)
    preset = arch_preset(str(data["name"]), family, cfg)
    c2c = data.get("class_to_category", preset.class_to_category)
    if not (
        isinstance(c2c, list | tuple)
        and len(c2c) == cfg.num_classes
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in c2c)
    ):
        raise MfdetrError(
            f"class_to_category must list {cfg.num_classes} non-negative category ids (one per class slot)", path=path
        )
    pre = data.get("preprocessing")
    try:
        pre = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}) if pre else None
    except (TypeError, AttributeError) as e:
        raise MfdetrError(f"bad preprocessing: {e}", path=path) from None
    if pre is not None and not (
        isinstance(pre.short_side, int)
        and isinstance(pre.max_size, int)
        and 0 < pre.short_side <= pre.max_size
        and len(pre.mean) == len(pre.std) == 3
    ):
        raise MfdetrError(
            "bad preprocessing: needs integer 0 < short_side <= max_size and 3-value mean and std", path=path
        )
    preset = dataclasses.replace(preset, class_to_category=tuple(c2c), preprocessing=pre or preset.preprocessing)
    return preset, family, cfg


def register_preset_file(path: Path) -> DetectorPreset:
    """Load a preset file and register it under its name."""
    from mfdetr.detectors.auto import register_arch

    preset, family, cfg = load_preset_file(path)
    return register_arch(preset, family, cfg)


__all__ = ["load_preset_file", "preset_record", "register_preset_file", "save_preset_file"]
