"""Backbone configs and the kind → builder table shared by every detector family.

A detector config holds a :class:`BackboneConfig` (plain data: ``kind``, ``out_indices`` and the
kind's size parameters); :func:`build_backbone` turns it into a :class:`Backbone`. New backbone kinds
register a builder with :func:`register_backbone_kind` (duplicates refused), so detector families
(DINO, H-DETR) never import a concrete backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mfdetr.config import from_dict
from mfdetr.detectors.backbones.base import Backbone
from mfdetr.errors import MfdetrError

BackboneBuilder = Callable[..., Backbone]
_KINDS: dict[str, BackboneBuilder] = {}


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to build.

    Args:
        kind: registered backbone kind (``"resnet"``, ``"tiny"``, ``"swin"``, ``"focalnet"``).
        out_indices: stages the detector uses (ascending subset of 0..3).
        params: the kind's keyword arguments (sizes: depths, embed dim, window, ...).
    """

    kind: str
    out_indices: tuple[int, ...] = (1, 2, 3)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        idx = tuple(int(i) for i in self.out_indices)
        if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] > 3:
            raise MfdetrError(f"backbone out_indices must be an ascending subset of 0..3, got {idx}")
        object.__setattr__(self, "out_indices", idx)
        # JSON/TOML give lists: store tuples so a config read back from a manifest equals the original
        object.__setattr__(self, "params", {k: tuple(v) if isinstance(v, list) else v for k, v in self.params.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "out_indices": list(self.out_indices), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneConfig:
        """The config of plain data through the typed config reader :func:`mfdetr.config.from_dict`."""
        return from_dict(cls, d, where="backbone config")


def register_backbone_kind(kind: str, builder: BackboneBuilder) -> None:
    """Register ``builder(out_indices=..., **params) -> Backbone`` under ``kind``."""
    if kind in _KINDS:
        raise ValueError(f"backbone kind {kind!r} is already registered")
    _KINDS[kind] = builder


def backbone_kinds() -> list[str]:
    return sorted(_KINDS)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone described by ``cfg`` (random weights)."""
    if cfg.kind not in _KINDS:
        raise MfdetrError(f"unknown backbone kind {cfg.kind!r} (known: {', '.join(backbone_kinds())})")
    try:
        return _KINDS[cfg.kind](out_indices=cfg.out_indices, **dict(cfg.params))
    except TypeError as e:
        raise MfdetrError(f"backbone {cfg.kind!r}: bad parameters {dict(cfg.params)}: {e}") from None
