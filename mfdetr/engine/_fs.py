"""Small torch-free file helpers shared by the engine modules."""

from __future__ import annotations

from pathlib import Path

from mfdetr.outputs import atomic_write


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder + ``os.replace``)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data), what="file")
