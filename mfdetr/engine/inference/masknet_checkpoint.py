"""The trained mask network for inference: its checkpoint (:func:`load_masknet_checkpoint`), the detector
weights it runs on (:func:`detector_checkpoint`), and the names of the categories it can output.

The MaskNet checkpoint is the training run's ``ckpt.pt`` (:mod:`mfdetr.engine.trainer`: ``model``,
``masknet_config``, ``meta.detector`` = the identity of the cache it was trained on: detector name,
checkpoint sha256, d, level strides, C1 channels, category map) or a plain dict ``{"masknet_config",
"model"[, "detector", "class_to_category", "categories", "enc_layer"]}``. The network is sized by the
detector preset (d, level strides, C1 channels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfdetr.contracts import DetectorPreset
from mfdetr.data.coco_names import COCO_NAMES
from mfdetr.engine.inference.names import category_names
from mfdetr.errors import MfdetrError

__all__ = [
    "COCO_NAMES",
    "LoadedMaskNet",
    "category_names",
    "detector_checkpoint",
    "load_masknet_checkpoint",
    "preset_queries",
]


@dataclass
class LoadedMaskNet:
    """A trained mask network ready for inference, with what its checkpoint records."""

    model: torch.nn.Module
    config: Any  # MaskNetConfig
    enc_layer: int
    class_to_category: tuple[int, ...]
    categories: dict[int, str]
    detector: str | None
    detector_sha256: str | None
    path: Path
    #: detector tensors a fine-tuning run trained (``online.finetune``), to load over the detector's weights
    detector_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _identity(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The detector identity a checkpoint records (engine: ``meta.detector``; plain: top-level keys)."""
    meta = ckpt.get("meta")
    ident = dict(meta.get("detector") or {}) if isinstance(meta, Mapping) else {}
    online = meta.get("online") if isinstance(meta, Mapping) else None
    if isinstance(online, Mapping) and online.get("detector"):
        ident.setdefault("detector.name", online["detector"])
    if "detector" in ckpt and isinstance(ckpt["detector"], str):
        ident.setdefault("detector.name", ckpt["detector"])
    if "class_to_category" in ckpt:
        ident.setdefault("category_map", list(ckpt["class_to_category"]))
    return ident


def _meta(ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = ckpt.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def _categories_record(value: Any) -> dict[int, str]:
    """``[{"id", "name"}, ...]`` or ``{id: name}`` → ``{id: name}``."""
    if isinstance(value, Mapping):
        return {int(k): str(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return {int(c["id"]): str(c["name"]) for c in value if isinstance(c, Mapping) and "id" in c and "name" in c}
    return {}


def load_masknet_checkpoint(
    path: str | Path, *, preset: DetectorPreset, device: torch.device | str = "cpu"
) -> LoadedMaskNet:
    """Load a trained MaskNet for the detector ``preset`` (see the module doc for the formats).

    Raises:
        MfdetrError: missing/unreadable file, not a MaskNet checkpoint, trained on another detector
            (name, d, level strides, C1 channels or class slots differ), or weights that do not fit.
    """
    from mfdetr.config import from_dict
    from mfdetr.engine.checkpoint import load_weights, safe_torch_load
    from mfdetr.masknet import MaskNetConfig, build_masknet

    p = Path(path)
    if not p.is_file():
        raise MfdetrError("MaskNet checkpoint not found", path=p)
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "masknet_config" not in ckpt:
        raise MfdetrError(
            "not a MaskNet checkpoint (needs 'model' and 'masknet_config'; pass a training run's ckpt.pt)", path=p
        )
    cfg = from_dict(MaskNetConfig, dict(ckpt["masknet_config"]), where=f"{p}: masknet_config")
    if "enc_layer" in ckpt and int(ckpt["enc_layer"]) != cfg.enc_layer:
        raise MfdetrError(f"records enc_layer={ckpt['enc_layer']} but masknet_config.enc_layer={cfg.enc_layer}", path=p)
    ident = _identity(ckpt)
    name = ident.get("detector.name")
    if name is not None and name != preset.name:
        raise MfdetrError(
            f"was trained on the outputs of detector {name!r}, not {preset.name!r} (pass --detector {name})", path=p
        )
    checks = {
        "hidden_dim": preset.hidden_dim,
        "level_strides": list(preset.level_strides),
        "c1_channels": preset.c1_channels,
        "num_classes": preset.num_classes,
    }
    for key, want in checks.items():
        if key in ident and ident[key] is not None and _plain(ident[key]) != _plain(want):
            raise MfdetrError(f"was trained for a detector with {key}={ident[key]}, {preset.name!r} has {want}", path=p)
    c2c = tuple(int(c) for c in ident.get("category_map") or preset.class_to_category)
    if len(c2c) != preset.num_classes:
        raise MfdetrError(f"records {len(c2c)} class slots, detector {preset.name!r} has {preset.num_classes}", path=p)
    if not 1 <= cfg.enc_layer <= preset.num_encoder_layers:
        raise MfdetrError(
            f"uses encoder layer {cfg.enc_layer}, detector {preset.name!r} has {preset.num_encoder_layers}", path=p
        )
    model = build_masknet(
        cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
    )
    from mfdetr.engine.finetune import split_state

    masknet_sd, detector_sd = split_state(ckpt["model"])
    load_weights(model, masknet_sd, path=p, what="its MaskNet config")
    model.eval().requires_grad_(False).to(device)
    return LoadedMaskNet(
        model=model,
        config=cfg,
        enc_layer=cfg.enc_layer,
        class_to_category=c2c,
        categories=_categories_record(ckpt.get("categories") or _meta(ckpt).get("categories")),
        detector=name,
        detector_sha256=ident.get("checkpoint.sha256"),
        path=p,
        detector_tensors=detector_sd,
    )


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def preset_queries(preset: DetectorPreset) -> int:
    """Queries the detector runs at inference (top-K keeps at most this many)."""
    n = preset.num_queries or preset.arch.get("num_queries")
    return int(n) if n else 100


def detector_checkpoint(preset: DetectorPreset, checkpoint: str | Path | None) -> Path:
    """The detector weights file: ``checkpoint``, else the preset's weights shipped in the package
    (``mfdetr/detectors/weights/<checkpoint_file>``, e.g. the ``demo`` preset)."""
    if checkpoint is not None:
        p = Path(checkpoint)
        if not p.is_file():
            raise MfdetrError("detector checkpoint file not found", path=p)
        return p
    import mfdetr.detectors

    shipped = (
        Path(mfdetr.detectors.__file__).resolve().parent / "weights" / preset.checkpoint_file
        if preset.checkpoint_file
        else None
    )
    if shipped is None or not shipped.is_file():
        raise MfdetrError(
            f"detector {preset.name!r} ships no weights in this installation: pass --checkpoint FILE"
            + (f" (expected {shipped})" if shipped is not None else "")
        )
    return shipped
