"""The official state-dict key manifests under ``tests/data/manifests`` (``key<TAB>shape<TAB>dtype`` rows,
shape as ``AxBxC``)."""

from __future__ import annotations

from pathlib import Path

import torch

MANIFESTS = Path(__file__).parent / "data" / "manifests"
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest_part(name: str, prefix: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Entries of ``name.keys.tsv`` under ``prefix`` (prefix stripped), in state-dict order."""
    rows = []
    for line in (MANIFESTS / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.startswith(prefix):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key[len(prefix) :], tuple(int(s) for s in shape.split("x")), _DTYPES[dtype]))
    return rows


def read_manifest(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every entry of ``name.keys.tsv``: key → (shape, dtype) (a scalar has shape ``()``)."""
    out = {}
    for line in (MANIFESTS / f"{name}.keys.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(x) for x in shape.split("x")) if shape else (), _DTYPES[dtype])
    return out
