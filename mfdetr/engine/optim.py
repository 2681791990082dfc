"""The optimizer of MaskNet's training: AdamW, fused where the device has the kernel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def fused_adamw_fits(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW can update ``params`` with its fused kernel (floating-point tensors on CPU or CUDA)."""
    ps = list(params)
    return bool(ps) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in ps)


def make_adamw(groups: list[dict[str, Any]] | Iterable[torch.Tensor], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(groups, **kwargs)``, fused when every parameter allows it (the same update with
    one kernel per step instead of one per tensor and operation)."""
    groups = list(groups)
    params = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    return torch.optim.AdamW(groups, fused=fused_adamw_fits(params) or None, **kwargs)
