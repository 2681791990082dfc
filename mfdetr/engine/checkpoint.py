"""Checkpoints (atomic), RNG state capture and the run record.

A checkpoint is a ``torch.save`` dict:

- ``model`` (the unwrapped module's state dict), ``optimizer``, ``scaler`` (AMP GradScaler or None),
  ``schedule`` (for the record; the lr is a pure function of the step);
- ``step`` — optimiser steps completed; training resumes at this global step (the data order and every
  step's randomness are functions of ``(seed, step)``, see :mod:`mfdetr.engine.sampling`);
- ``rng`` — torch/CUDA/numpy/python RNG states (restored as well, belt and braces);
- ``log_window`` — the partial logging window, so a resumed run logs the same means;
- ``config`` — the full run config as plain data; ``masknet_config`` — the mask network's config
  (a checkpoint from a different MaskNet config is refused at load time);
- ``meta`` — manifest hash, library versions, world size.

Writes go to ``<file>.tmp`` then :func:`os.replace`, so a kill mid-write never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfdetr.engine._fs import atomic_write_text
from mfdetr.errors import MfdetrError

__all__ = ["atomic_torch_save", "atomic_write_text", "capture_rng", "check_masknet_config", "config_hash",
           "library_versions", "load_checkpoint", "restore_rng", "seed_step", "step_seed"]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng() -> dict[str, Any]:
    """The process's RNG states (torch CPU, CUDA if initialised, numpy, python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step, rank): every step's randomness (dropout, point
    sampling in the loss) is reproducible from the step number alone, whatever ran before."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch (all devices), numpy and python for one training step."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    np.random.seed(s % (1 << 32))
    random.seed(s)


def library_versions() -> dict[str, str]:
    """Versions recorded in every run folder."""
    import torchvision
    import zarr

    from mfdetr import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "zarr": zarr.__version__, "numpy": np.__version__,
            "mfdetr": __version__, "platform": platform.platform()}


def config_hash(data: Any) -> str:
    """sha256 of a plain-data config in canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer; a missing or foreign file is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise MfdetrError("checkpoint not found", path=p)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise MfdetrError(f"not a readable checkpoint ({type(e).__name__}: {e})", path=p) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise MfdetrError("not an mfdetr training checkpoint (no 'model'/'step')", path=p)
    return ckpt


def check_masknet_config(ckpt: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose recorded MaskNet config differs from ``expected``."""
    from mfdetr.engine.config import diff_configs

    got = ckpt.get("masknet_config")
    if got is None:
        return
    diff = diff_configs(dict(got), dict(expected))
    if diff:
        raise MfdetrError(f"checkpoint was trained with a different MaskNet config (differs in: "
                          f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''})", path=path)


def python_command() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])
