"""``--detector NAME [--checkpoint FILE] [--detector-config FILE]`` → the preset a command runs.

A preset name (``demo``, ``dino_r50``, a plugin's, a saved preset file's path) resolves to that preset
and its weights (:func:`~mfdetr.detectors.defaults.preset_weights`); ``auto`` builds the architecture
from the checkpoint's embedded training ``args`` and tensor shapes (or from ``--detector-config``) and
registers it under a name derived from the checkpoint file, so every later step of the command (and
``build_detector``) finds it like any preset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mfdetr.contracts import DetectorPreset, default_enc_layer
from mfdetr.detectors.defaults import preset_weights
from mfdetr.detectors.registry import get_preset, list_detectors, load_plugins
from mfdetr.errors import MfdetrError

AUTO = "auto"


@dataclass(frozen=True)
class ResolvedDetector:
    """The preset a command runs, its weights file (``None``: random weights of a test preset) and its
    default encoder layer."""

    name: str
    preset: DetectorPreset
    checkpoint: Path | None
    enc_layer: int


def resolve_detector(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    need_file: bool = False,
    allow_missing_weights: bool = False,
    categories_file: str | Path | None = None,
    slot_categories: str | Path | None = None,
    need_categories: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> ResolvedDetector:
    """Resolve ``name`` (a preset, a preset file, or ``auto``) and its weights; ``need_file`` refuses a
    preset with no weights file (the cache records the checkpoint's sha256). ``categories_file``: the
    command's COCO annotation file, ``slot_categories``: a ``--categories`` file naming the class slots'
    categories in order; an auto preset's slots are matched to them
    (:func:`mfdetr.detectors.categories.slot_map`). ``need_categories`` (default: unless
    ``allow_missing_weights``): a detrex checkpoint without either is an error."""
    load_plugins()
    if name == AUTO or config_file is not None:
        from mfdetr.detectors.auto import register_auto_preset

        if name != AUTO:
            raise MfdetrError(
                f"--detector-config describes the architecture: use it with --detector auto, not {name!r}"
            )
        if checkpoint is None:
            raise MfdetrError("--detector auto reads the architecture from the checkpoint: pass --checkpoint FILE")
        preset = register_auto_preset(
            Path(checkpoint),
            config_file=config_file,
            categories_file=Path(categories_file) if categories_file else None,
            slot_categories=Path(slot_categories) if slot_categories else None,
            need_categories=(not allow_missing_weights if need_categories is None else need_categories),
        )
        if echo is not None:
            from mfdetr.detectors.auto import describe_preset

            echo(describe_preset(preset))
    else:
        preset = _named_preset(name, checkpoint, categories_file, slot_categories)
    try:
        weights = preset_weights(preset, checkpoint)
    except MfdetrError:
        if not allow_missing_weights:
            raise
        weights = None
    if weights is None and need_file:
        raise MfdetrError(f"detector {preset.name!r} has no released weights: pass --checkpoint FILE")
    return ResolvedDetector(
        name=preset.name, preset=preset, checkpoint=weights, enc_layer=default_enc_layer(preset.num_encoder_layers)
    )


def _named_preset(
    name: str,
    checkpoint: str | Path | None,
    categories_file: str | Path | None,
    slot_categories: str | Path | None = None,
) -> DetectorPreset:
    """A registered preset, or a preset file (``.toml``/``.json`` written by ``mfdetr detectors save``)."""
    if name.startswith(AUTO + "-") and checkpoint is not None and name not in list_detectors():
        from mfdetr.detectors.auto import register_auto_preset

        preset = register_auto_preset(
            Path(checkpoint),
            categories_file=Path(categories_file) if categories_file else None,
            slot_categories=Path(slot_categories) if slot_categories else None,
            need_categories=True,
        )  # a run recorded an auto preset: rebuild it
        if preset.name != name:
            raise MfdetrError(f"the run used detector {name!r}, the checkpoint resolves to {preset.name!r}")
        return preset
    if name.endswith((".toml", ".json")) or "/" in name:
        from mfdetr.detectors.preset_file import register_preset_file

        return register_preset_file(Path(name))
    return get_preset(name)


__all__ = ["AUTO", "ResolvedDetector", "resolve_detector"]
