"""What a preset implies when the user does not say: its weights file and its encoder layer.

- :func:`default_enc_layer`: the encoder layer MaskNet reads by default — paper Table 15 takes layer 4
  of 6, generalised to the layer at about two thirds of the detector's depth (3 layers → 2).
- :func:`preset_weights`: the checkpoint a command uses when ``--checkpoint`` is not given: the
  preset's weights shipped in the package (``mfdetr/detectors/weights/<checkpoint_file>``, e.g. the
  ``demo`` preset), ``None`` for presets with no released weights (tiny test presets: random
  weights by design), and a one-line error for a released model whose file is not shipped.
"""

from __future__ import annotations

from pathlib import Path

from mfdetr.contracts import DetectorPreset, default_enc_layer
from mfdetr.errors import MfdetrError

#: where presets ship their weights inside the package
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_weights(preset: DetectorPreset) -> Path | None:
    """The preset's weights file inside the package, if it ships one."""
    if not preset.checkpoint_file:
        return None
    p = WEIGHTS_DIR / preset.checkpoint_file
    return p if p.is_file() else None


def preset_weights(preset: DetectorPreset, checkpoint: str | Path | None) -> Path | None:
    """``checkpoint`` (must exist), else the shipped weights, else ``None`` for a preset without released
    weights; a released model whose weights are not shipped needs ``--checkpoint``."""
    if checkpoint is not None:
        p = Path(checkpoint)
        if not p.is_file():
            raise MfdetrError("detector checkpoint file not found", path=p)
        return p
    shipped = shipped_weights(preset)
    if shipped is not None:
        return shipped
    if preset.checkpoint_file:
        raise MfdetrError(
            f"detector {preset.name!r} ships no weights in this installation: pass --checkpoint FILE "
            f"(the released file is {preset.checkpoint_file})"
        )
    return None


__all__ = ["WEIGHTS_DIR", "default_enc_layer", "preset_weights", "shipped_weights"]
