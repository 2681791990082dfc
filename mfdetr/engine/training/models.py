"""The stage-2 models the training loop trains (:class:`~mfdetr.engine.training.loop.TrainModel`).

- :class:`Supervised` — a network and a criterion over ``(det, targets)`` batches: the cached and the
  online mode, MaskNet alone or on the positives only (``assigns_targets``: the network gets the
  targets and the step, :class:`~mfdetr.masknet.positives.PositivesOnly`).
- :class:`FineTunedModel` — :class:`~mfdetr.engine.finetune.FineTuned` (MaskNet + the partly unfrozen
  detector): the batch holds images, the network runs the detector and returns its outputs too; two
  parameter groups; some tuned parameters get no gradient (DDP is told).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mfdetr.engine.training.loop import ParamGroup

if TYPE_CHECKING:
    from mfdetr.engine.finetune import FineTuned

Criterion = Callable[[Any, Any, Any], Mapping[str, Tensor]]


def batch_image_ids(det: Any, targets: Any) -> list[Any]:
    """The image ids of a batch (from the GT instances, else the detector output's extras)."""
    ids = [getattr(t, "image_id", None) for t in targets] if isinstance(targets, list | tuple) else []
    if ids and all(i is not None for i in ids):
        return ids
    return list(getattr(det, "extras", {}).get("image_id", []))


class Supervised:
    """``criterion(network(det), det, targets)`` (or ``network(det, targets, step=step)`` when
    ``assigns_targets``); one parameter group of every trainable parameter."""

    unused_parameters = False

    def __init__(self, network: nn.Module, criterion: Criterion, *, assigns_targets: bool = False) -> None:
        self.network, self.criterion, self.assigns_targets = network, criterion, bool(assigns_targets)

    def to(self, device: torch.device) -> None:
        self.network.to(device)
        if isinstance(self.criterion, nn.Module):
            self.criterion.to(device)

    def param_groups(self) -> list[ParamGroup]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def losses(self, net: nn.Module, batch: Any, step: int) -> Mapping[str, Tensor]:
        det, targets = batch
        out = net(det, targets, step=step) if self.assigns_targets else net(det)
        return self.criterion(out, det, targets)

    def image_ids(self, batch: Any) -> list[Any]:
        det, targets = batch
        return batch_image_ids(det, targets)


class FineTunedModel(Supervised):
    """A :class:`~mfdetr.engine.finetune.FineTuned` network: ``net(images, targets, step=step)`` returns
    ``(masknet outputs, detector outputs)``; the criterion reads the detector outputs."""

    network: FineTuned
    #: some tuned detector parameters get no gradient from MaskNet's losses (class heads, the two-stage
    #: selection, the box head: RoIAlign passes no gradient to boxes), which DDP must be told
    unused_parameters = True

    def __init__(self, network: FineTuned, criterion: Criterion, *, assigns_targets: bool = False) -> None:
        super().__init__(network, criterion, assigns_targets=assigns_targets)

    def param_groups(self) -> list[ParamGroup]:
        return [g for g in self.network.param_groups() if g["params"]]

    def losses(self, net: nn.Module, batch: Any, step: int) -> Mapping[str, Tensor]:
        images, targets = batch
        out, det = net(images, targets, step=step) if self.assigns_targets else net(images)
        return self.criterion(out, det, targets)

    def image_ids(self, batch: Any) -> list[Any]:
        images, targets = batch
        return batch_image_ids(images, targets) or list(images.image_ids)


__all__ = ["Criterion", "FineTunedModel", "Supervised", "batch_image_ids"]
