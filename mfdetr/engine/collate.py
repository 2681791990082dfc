"""Batch per-image cached detector outputs of different sizes into one padded DetectorOutput.

A cache yields, per image, a :class:`~mfdetr.contracts.DetectorOutput` with batch size 1 whose feature
maps have that image's own size (or a fixed canvas). :func:`collate_detector_outputs` concatenates
them: every encoder level and C1 is zero-padded at the bottom/right to the batch maximum; valid sizes
travel in ``level_valid_hw`` / ``input_hw`` so consumers never depend on the padding (the
:class:`~mfdetr.contracts.DetectorOutput` contract). Non-tensor ``extras`` become per-image lists; batch-1 tensors with matching trailing
shapes are concatenated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.contracts import DetectorOutput, GTInstances


def _pad_to(t: Tensor, h: int, w: int) -> Tensor:
    ph, pw = h - t.shape[-2], w - t.shape[-1]
    return F.pad(t, (0, pw, 0, ph)) if ph or pw else t


def _cat_padded(maps: Sequence[Tensor]) -> Tensor:
    h = max(int(m.shape[-2]) for m in maps)
    w = max(int(m.shape[-1]) for m in maps)
    return torch.cat([_pad_to(m, h, w) for m in maps], dim=0)


def cat_detector_outputs(outs: Sequence[DetectorOutput]) -> DetectorOutput:
    """Concatenate DetectorOutputs along the batch (zero-padding feature maps to the largest).

    All inputs must share K (queries), d, C, C1, the encoder layers and the number of levels.
    """
    if not outs:
        raise ValueError("cannot collate an empty batch")
    first = outs[0]
    layers = sorted(first.enc_maps)
    for i, o in enumerate(outs):
        if sorted(o.enc_maps) != layers:
            raise ValueError(f"item {i}: encoder layers {sorted(o.enc_maps)} differ from {layers}")
        if o.queries.shape[1:] != first.queries.shape[1:] or o.logits.shape[1:] != first.logits.shape[1:]:
            raise ValueError(
                f"item {i}: queries/logits shape {tuple(o.queries.shape)}/{tuple(o.logits.shape)} "
                f"differs from {tuple(first.queries.shape)}/{tuple(first.logits.shape)}"
            )
    enc = {
        layer: [_cat_padded([o.enc_maps[layer][lvl] for o in outs]) for lvl in range(len(first.enc_maps[layer]))]
        for layer in layers
    }
    extras: dict[str, Any] = {}
    for key in first.extras:
        vals = [o.extras.get(key) for o in outs]
        if all(isinstance(v, Tensor) for v in vals) and len({tuple(v.shape[1:]) for v in vals}) == 1:
            extras[key] = torch.cat(vals, dim=0)
        else:
            flat: list[Any] = []
            for v in vals:
                flat.extend(v if isinstance(v, list) else [v])
            extras[key] = flat
    return DetectorOutput(
        queries=torch.cat([o.queries for o in outs]),
        boxes=torch.cat([o.boxes for o in outs]),
        logits=torch.cat([o.logits for o in outs]),
        enc_maps=enc,
        c1=_cat_padded([o.c1 for o in outs]),
        input_hw=torch.cat([o.input_hw for o in outs]),
        orig_hw=torch.cat([o.orig_hw for o in outs]),
        level_valid_hw=torch.cat([o.level_valid_hw for o in outs]),
        extras=extras,
    )


@dataclass
class Stage2Batch:
    """A collated stage-2 batch: padded detector outputs + per-image GT instances.

    ``pin_memory()`` is what DataLoader's pin-memory thread calls (it does not know our dataclasses);
    ``to()`` moves it to the training device, casting float features to ``dtype`` (caches hold fp16).
    Unpacks as ``det, targets = batch``.
    """

    det: DetectorOutput
    targets: list[GTInstances]

    def __len__(self) -> int:
        return self.det.batch_size

    def __iter__(self) -> Iterator[Any]:
        return iter((self.det, self.targets))

    def pin_memory(self) -> Stage2Batch:
        return Stage2Batch(det=self.det.map(torch.Tensor.pin_memory), targets=self.targets)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = torch.float32) -> Stage2Batch:
        return Stage2Batch(det=self.det.to(device, dtype=dtype), targets=[t.to(device) for t in self.targets])


def collate_detector_outputs(items: Sequence[tuple[DetectorOutput, GTInstances]]) -> Stage2Batch:
    """DataLoader ``collate_fn``: ``[(DetectorOutput B=1, GTInstances), ...]`` → :class:`Stage2Batch`."""
    return Stage2Batch(det=cat_detector_outputs([d for d, _ in items]), targets=[t for _, t in items])
