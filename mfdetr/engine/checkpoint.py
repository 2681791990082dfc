"""Checkpoints (atomic), RNG state capture and the run record.

A checkpoint is a ``torch.save`` dict:

- ``model`` (the unwrapped module's state dict), ``optimizer``, ``scaler`` (AMP GradScaler or None),
  ``schedule`` (for the record; the lr is a pure function of the step);
- ``step`` — optimiser steps completed; training resumes at this global step (the data order and every
  step's randomness are functions of ``(seed, step)``, see :mod:`mfdetr.engine.sampling`);
- ``rng`` — torch/CUDA/numpy/python RNG states (restored as well, belt and braces), as tensors and
  plain lists/ints (never numpy objects);
- ``log_window`` — the partial logging window, so a resumed run logs the same means;
- ``config`` — the full run config as plain data; ``masknet_config`` — the mask network's config
  (a checkpoint from a different MaskNet config is refused at load time);
- ``meta`` — manifest hash, library versions, world size.

Writes go to ``<file>.tmp`` then :func:`os.replace`, so a kill mid-write never leaves a torn file.

Reading never runs code from the file: :func:`safe_torch_load` is ``torch.load(weights_only=True)``
(tensors, containers and plain scalars only). Checkpoints written before the RNG states were stored
as plain data hold numpy's MT19937 key as an ``ndarray`` and torch's version as a ``TorchVersion``:
only numpy's array reconstruction, the ``uint32`` dtype and ``TorchVersion`` (a ``str``) are
allow-listed for them (no object arrays, no callables).
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

from mfdetr.errors import MfdetrError, load_failure
from mfdetr.outputs import atomic_write, atomic_write_text

__all__ = [
    "atomic_torch_save",
    "atomic_write_text",
    "capture_rng",
    "check_masknet_config",
    "check_resume_source",
    "config_hash",
    "library_versions",
    "load_checkpoint",
    "load_weights",
    "restore_rng",
    "safe_torch_load",
    "seed_step",
    "step_seed",
]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def capture_rng() -> dict[str, Any]:
    """The process's RNG states (torch CPU, CUDA if initialised, numpy, python) as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (also the numpy ``ndarray`` form of older checkpoints)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
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

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "mfdetr": __version__,
        "platform": platform.platform(),
    }


def config_hash(data: Any) -> str:
    """sha256 of a plain-data config in canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _legacy_globals() -> list[Any]:
    """What older checkpoints hold besides plain data: numpy's plain-array reconstruction (uint32 only,
    RNG states) and torch's version string (a ``str`` subclass)."""
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), TorchVersion]


def safe_torch_load(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, never code from the file.

    Raises:
        MfdetrError: a missing, unreadable or refused file (one line naming it).
    """
    p = Path(path)
    if not p.is_file():
        raise MfdetrError("checkpoint not found", path=p)
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise MfdetrError(load_failure(e), path=p) from None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer; a missing, foreign or unsafe file is a clear error."""
    p = Path(path)
    ckpt = safe_torch_load(p, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise MfdetrError(f"not an mfdetr training checkpoint (holds a {type(ckpt).__name__}, not a dict)", path=p)
    missing = [k for k in ("model", "step", "config", "masknet_config") if k not in ckpt]
    if missing:
        raise MfdetrError(
            f"not an mfdetr training checkpoint (no {', '.join(repr(k) for k in missing)} entry; "
            "pass a training run's ckpt.pt)",
            path=p,
        )
    if not isinstance(ckpt["config"], Mapping) or not isinstance(ckpt["masknet_config"], Mapping):
        raise MfdetrError("not an mfdetr training checkpoint ('config'/'masknet_config' are not tables)", path=p)
    return ckpt


def load_weights(
    model: torch.nn.Module, state: Mapping[str, Any], *, path: str | Path, what: str = "the MaskNet config"
) -> None:
    """``model.load_state_dict(state)`` (strict); a mismatch is one line listing the keys at fault."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(want[k].shape)}"
        for k in want
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != want[k].shape
    ]

    def listed(label: str, keys: list[str]) -> str:
        return f"{label} {len(keys)}: " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")

    parts = [
        listed(label, keys)
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes))
        if keys
    ]
    if not parts:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as e:
            parts = [" ".join(str(e).split())[:300]]
    raise MfdetrError(f"weights do not fit {what} ({'; '.join(parts)})", path=path)


def check_resume_source(
    run_dir: str | Path, *, key: str, current: Mapping[str, Any], what: str, legacy_hash: tuple[str, str] | None = None
) -> None:
    """Before ``--resume``: refuse when the data source recorded in the run's checkpoint (``meta[key]``)
    differs from ``current``; the message names the differing fields with both values. ``legacy_hash``
    ``(meta key, current value)`` compares a run that recorded only a hash."""
    from mfdetr.engine.config import diff_configs

    path = Path(run_dir) / "ckpt.pt"
    if not path.is_file():
        return  # the trainer reports that there is nothing to resume
    meta = load_checkpoint(path).get("meta") or {}
    recorded = meta.get(key)
    if isinstance(recorded, Mapping):
        diff = sorted(diff_configs(recorded, current), key=lambda k: k == "created_utc")  # settings first
        if diff:

            def value(m: Mapping[str, Any], dotted: str) -> str:
                cur: Any = m
                for part in dotted.split("."):
                    cur = cur.get(part, "<missing>") if isinstance(cur, Mapping) else "<missing>"
                return json.dumps(cur, default=str)[:60]

            shown = "; ".join(f"{k}: {value(recorded, k)} (run) vs {value(current, k)} (now)" for k in diff[:4])
            raise MfdetrError(
                f"cannot resume with a different {what}: {shown}{' ...' if len(diff) > 4 else ''}", path=run_dir
            )
    elif legacy_hash is not None and meta.get(legacy_hash[0]) not in (None, legacy_hash[1]):
        raise MfdetrError(
            f"cannot resume with a different {what}: the run recorded {legacy_hash[0]} "
            f"{str(meta[legacy_hash[0]])[:12]}…, this one has {legacy_hash[1][:12]}…",
            path=run_dir,
        )


def check_masknet_config(ckpt: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose recorded MaskNet config differs from ``expected``."""
    from mfdetr.engine.config import diff_configs

    got = ckpt.get("masknet_config")
    if got is None:
        return
    diff = diff_configs(dict(got), dict(expected))
    if diff:
        raise MfdetrError(
            f"checkpoint was trained with a different MaskNet config (differs in: "
            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''})",
            path=path,
        )


def python_command() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])
