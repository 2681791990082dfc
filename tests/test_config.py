from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mfdetr.config import apply_overrides, from_dict, load_toml, to_dict
from mfdetr.errors import MfdetrError


@dataclass
class Inner:
    layers: int = 2
    kind: str = "deformable"


@dataclass
class Outer:
    lr: float = 1.5e-4
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (16, 32)


def test_roundtrip_and_overrides():
    d = apply_overrides(to_dict(Outer()), ["inner.layers=3", "lr=1e-3", "sizes=[64]"])
    cfg = from_dict(Outer, d)
    assert cfg.inner.layers == 3 and cfg.lr == 1e-3 and cfg.sizes == (64,)


def test_unknown_key_is_clear_error():
    with pytest.raises(MfdetrError, match="unknown key.*bogus"):
        from_dict(Outer, {"inner": {"bogus": 1}})


def test_wrong_type_is_clear_error():
    with pytest.raises(MfdetrError, match="config.inner.layers"):
        from_dict(Outer, {"inner": {"layers": "three"}})


def test_bad_toml_names_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("a = [")
    with pytest.raises(MfdetrError, match="x.toml: malformed TOML"):
        load_toml(p)
    with pytest.raises(MfdetrError, match="not found"):
        load_toml(tmp_path / "missing.toml")
