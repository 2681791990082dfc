"""Name → detector builder table (refuses duplicates). Presets register themselves on import.

Third-party detectors: set ``MFDETR_PLUGINS`` to a comma-separated list of importable modules; the
commands that build detectors (``mfdetr cache``) call :func:`load_plugins` first, and each module
registers its presets on import with :func:`register_detector`.

A builder takes ``checkpoint`` (a path, a state dict or ``None`` for random weights, e.g. tiny test
presets) and ``device`` and returns a frozen :class:`mfdetr.contracts.FrozenDetector`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mfdetr.contracts import DetectorPreset, FrozenDetector
from mfdetr.errors import MfdetrError

Builder = Callable[..., FrozenDetector]
_BUILDERS: dict[str, Builder] = {}
_PRESETS: dict[str, DetectorPreset] = {}


def register_detector(preset: DetectorPreset, builder: Builder) -> None:
    """Register ``builder`` under ``preset.name``; a duplicate name is an error."""
    if preset.name in _BUILDERS:
        raise ValueError(f"detector preset {preset.name!r} is already registered")
    _BUILDERS[preset.name] = builder
    _PRESETS[preset.name] = preset


def unregister_detector(name: str) -> None:
    """Remove a preset (tests only)."""
    _BUILDERS.pop(name, None)
    _PRESETS.pop(name, None)


def list_detectors() -> list[str]:
    return sorted(_BUILDERS)


def get_preset(name: str) -> DetectorPreset:
    if name not in _PRESETS and os.environ.get(PLUGINS_ENV):
        load_plugins()  # a plugin preset asked for by name: every entry point finds it
    if name not in _PRESETS:
        raise MfdetrError(f"unknown detector {name!r} (known: {', '.join(list_detectors()) or 'none'})")
    return _PRESETS[name]


def build_detector(
    name: str, *, checkpoint: str | Path | dict[str, Any] | None = None, device: str = "cpu", **kwargs: Any
) -> FrozenDetector:
    """Build the frozen detector ``name`` and load ``checkpoint`` strictly."""
    get_preset(name)
    return _BUILDERS[name](checkpoint=checkpoint, device=device, **kwargs)


PLUGINS_ENV = "MFDETR_PLUGINS"


def load_plugins(modules: str | None = None) -> list[str]:
    """Import the detector plugin modules named in ``modules`` (default: ``$MFDETR_PLUGINS``).

    ``modules`` is a comma-separated list of importable module names; each registers its presets on
    import. Returns the modules imported. A module that cannot be imported is a :class:`MfdetrError`.
    """
    spec = os.environ.get(PLUGINS_ENV, "") if modules is None else modules
    names = [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MfdetrError(f"cannot import detector plugin {name!r} (from ${PLUGINS_ENV}): {e}") from None
    return names
