"""Strict loading of official DETR-family checkpoints (one rename table per format, kept as data).

Released files are read as published: a training checkpoint dict (``'model'``, or ``'ema_model'``
/ ``'state_dict'``), or a bare state dict; a leading ``module.`` (DistributedDataParallel) is
stripped. ``torch.load(weights_only=True)`` is used with ``argparse.Namespace`` allow-listed (official
checkpoints embed their training args).

Mapping is strict: after renaming, every key must be used, none may be missing, shapes must be equal;
keys that alias one of our tensors (DINO stores each shared head under 12 keys) must carry identical
values. Anything else raises :class:`~mfdetr.errors.MfdetrError` listing the offending keys — a frozen
detector with one silently unmatched key would corrupt every cached epoch.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.errors import MfdetrError, load_failure

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
CheckpointSource = str | Path | Mapping[str, Any]

#: top-level entries of a training checkpoint that may hold the weights, in order of preference
_WRAPPER_KEYS = ("model", "ema_model", "state_dict", "model_state_dict")


@dataclass(frozen=True)
class CheckpointFormat:
    """An official checkpoint layout.

    Args:
        name: e.g. ``"IDEA-Research/DINO"``.
        renames: ordered ``(regex, replacement)`` rules applied to every key in turn
            (``re.sub``, first match per rule); a replacement of ``None`` drops matching keys (e.g.
            BN ``num_batches_tracked``). Our module names follow the official ones, so tables are short.
    """

    name: str
    renames: tuple[tuple[str, str | None], ...] = ()

    def rename(self, key: str) -> str | None:
        for pattern, repl in self.renames:
            if re.search(pattern, key):
                if repl is None:
                    return None
                key = re.sub(pattern, repl, key, count=1)
        return key


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """``torch.load`` a checkpoint file safely (tensors + containers + ``argparse.Namespace``)."""
    p = Path(path)
    if not p.is_file():
        raise MfdetrError("checkpoint file not found", path=p)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise MfdetrError(load_failure(e), path=p) from None
    if not isinstance(obj, Mapping):
        raise MfdetrError(f"checkpoint holds a {type(obj).__name__}, expected a dict", path=p)
    return obj


def unwrap_state_dict(obj: Mapping[str, Any], *, origin: str = "checkpoint") -> StateDict:
    """The state dict inside a training checkpoint (or ``obj`` itself), ``module.`` prefix stripped."""
    sd: Any = obj
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            sd = obj[key]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise MfdetrError(f"{origin}: no tensors found (top-level keys: {sorted(obj)[:8]})")
    non_tensor = sorted(k for k in sd if k not in tensors)
    if non_tensor:
        raise MfdetrError(f"{origin}: state dict has non-tensor entries: {non_tensor[:8]}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def remap_state_dict(sd: Mapping[str, Tensor], fmt: CheckpointFormat, *, expected: set[str]) -> StateDict:
    """Rename official keys to ours with ``fmt``; returns ``sd`` unchanged if already in our layout."""
    if set(sd) == expected:
        log.info("%s: checkpoint already in mfdetr layout (%d keys)", fmt.name, len(sd))
        return dict(sd)
    out: StateDict = {}
    report = []
    for k, v in sd.items():
        new = fmt.rename(k)
        if new is None:
            report.append(f"  {k} -> (dropped)")
            continue
        if new in out:
            raise MfdetrError(f"{fmt.name}: keys collide after renaming: {new!r}")
        if new != k:
            report.append(f"  {k} -> {new}")
        out[new] = v
    log.info(
        "%s: remapped %d keys (%d renamed/dropped)%s",
        fmt.name,
        len(sd),
        len(report),
        "\n" + "\n".join(report) if report else "",
    )
    return out


def _fmt_keys(keys: list[str], n: int = 12) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, Tensor], *, origin: str = "checkpoint") -> None:
    """Copy ``sd`` into ``model``: every key used, none missing, equal shapes, aliases consistent."""
    ours = model.state_dict(keep_vars=True)
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    mis_shaped = sorted(
        f"{k} {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}"
        for k in set(sd) & set(ours)
        if tuple(sd[k].shape) != tuple(ours[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatch ({len(mis_shaped)}): {_fmt_keys(mis_shaped)}")
    if problems:
        raise MfdetrError(f"{origin} does not match the model: " + "; ".join(problems))
    # keys aliasing one tensor of ours (shared heads) must agree
    groups: dict[int, list[str]] = {}
    for k, t in ours.items():
        groups.setdefault(id(t), []).append(k)
    inconsistent = []
    for keys in groups.values():
        first = sd[keys[0]]
        if len(keys) > 1 and first.device.type != "meta":
            inconsistent += [f"{k} != {keys[0]}" for k in keys[1:] if not torch.equal(first, sd[k].to(first.device))]
    if inconsistent:
        raise MfdetrError(f"{origin}: keys that share one tensor hold different values: {_fmt_keys(inconsistent)}")
    with torch.no_grad():
        for keys in groups.values():
            dst = ours[keys[0]]
            src = sd[keys[0]]
            if dst.device.type == "meta":
                continue
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def load_checkpoint(model: nn.Module, source: CheckpointSource, fmt: CheckpointFormat) -> None:
    """Load a released file (path) or a (wrapped) state dict into ``model`` strictly via ``fmt``."""
    origin = str(source) if isinstance(source, (str, Path)) else "state dict"
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = unwrap_state_dict(obj, origin=origin)
    sd = remap_state_dict(sd, fmt, expected=set(model.state_dict().keys()))
    load_state_dict_strict(model, sd, origin=origin)
