"""Device selection shared by every command (ground floor).

``auto`` picks CUDA when available, else the CPU. Under ``torchrun`` a bare ``cuda`` (or ``auto`` on a
CUDA machine) becomes ``cuda:LOCAL_RANK``. Asking for CUDA where there is none, or an unknown device
string, is a user error (one line, no traceback).
"""

from __future__ import annotations

import os

import torch

from mfdetr.errors import MfdetrError


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """The torch device for a ``--device`` value (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ...).

    Args:
        device: what the user asked for.
        local_rank: this process's local rank; default: ``$LOCAL_RANK`` when torchrun set it.
    """
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MfdetrError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    try:
        return torch.device(device)
    except RuntimeError:
        raise MfdetrError(f"--device: unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
