"""Official config files read as data, never executed.

- IDEA-Research/DINO and FocalNet-DINO ``config/DINO/*.py``: top-level ``name = <literal>``
  assignments, each value read with :func:`ast.literal_eval`; ``_base_ = [...]`` files (relative to the
  config) are read first and overridden. Assignments that are not literals are ignored.
- HDETR/H-Deformable-DETR ``configs/**/*.sh``: the ``--flag [value]`` arguments of the command line
  (split with :mod:`shlex`); the architecture switches it passes as bare flags (``--two_stage``,
  ``--with_box_refine``, ``--mixed_selection``, ``--look_forward_twice``) are False when absent.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError

#: H-Deformable-DETR ``store_true`` architecture switches (False unless the script passes them)
HDETR_SWITCHES = ("two_stage", "with_box_refine", "mixed_selection", "look_forward_twice")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a DINO ``.py`` or H-DETR ``.sh`` config as a dict."""
    if not path.is_file():
        raise MfdetrError("detector config file not found", path=path)
    if path.suffix == ".py":
        return read_python_config(path)
    if path.suffix == ".sh":
        return read_shell_config(path)
    raise MfdetrError("detector config must be an official DINO .py or H-Deformable-DETR .sh file", path=path)


def read_python_config(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in _seen:
        raise MfdetrError("config _base_ files include each other", path=path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise MfdetrError(f"not a readable Python config: {type(e).__name__}: {e}", path=path) from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            continue  # an expression, not data: not read
    out: dict[str, Any] = {}
    bases = values.pop("_base_", [])
    for base in [bases] if isinstance(bases, str) else list(bases):
        out.update(read_python_config(path.parent / str(base), _seen + (path.resolve(),)))
    out.update(values)
    return out


def read_shell_config(path: Path) -> dict[str, Any]:
    text = path.read_text().replace("\\\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        raise MfdetrError(f"cannot split the script's arguments: {e}", path=path) from None
    out: dict[str, Any] = {k: False for k in HDETR_SWITCHES}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and len(tok) > 2:
            name = tok[2:].replace("-", "_")
            values = []
            while i + 1 < len(tokens) and not tokens[i + 1].startswith(("-", "$")) and "=" not in tokens[i + 1]:
                i += 1
                values.append(_scalar(tokens[i]))
            out[name] = True if not values else values[0] if len(values) == 1 else values
        i += 1
    return out


def _scalar(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


__all__ = ["HDETR_SWITCHES", "read_config_file", "read_python_config", "read_shell_config"]
