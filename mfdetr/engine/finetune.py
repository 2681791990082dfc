"""Fine-tuning the detector together with MaskNet in the online mode (paper Table 11).

The paper's method keeps the detector frozen; Table 11 compares fine-tuning the whole DETR
(``finetune = "all"``) or only its transformer encoder and decoder (``"transformer"``), with the
detector's learning rate 1/10 of the new parameters'. :class:`FineTuned` holds both networks so the
training loop sees one model:

- ``forward(images)`` runs the detector with gradients (through the online
  :class:`~mfdetr.engine.online.DetectorStep`), then MaskNet, and returns both outputs; running the
  detector inside ``forward`` lets DDP see where its parameters are used;
- :meth:`param_groups` gives the optimiser two groups (MaskNet at ``lr_scale = 1``, the unfrozen
  detector parameters at ``detector_lr_mult``);
- the detector stays in ``eval()`` whatever the loop asks (frozen BN, no dropout, the inference query
  set of H-DETR), so its outputs keep the meaning MaskNet was designed for;
- the state dict holds ``masknet.*`` and only the **fine-tuned** detector tensors as ``detector.*``
  (the rest is the detector checkpoint the run names), which :func:`split_state` takes apart again for
  ``mfdetr predict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.errors import MfdetrError

FINETUNE_MODES = ("none", "transformer", "all")
MASKNET_PREFIX, DETECTOR_PREFIX = "masknet.", "detector."


def finetuned_parameters(detector: nn.Module, mode: str) -> Iterator[tuple[str, nn.Parameter]]:
    """The detector parameters a fine-tuning ``mode`` trains (names relative to the detector)."""
    if mode not in FINETUNE_MODES:
        raise MfdetrError(f"online.finetune must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
    if mode == "none":
        return
    if mode == "transformer":
        sub = getattr(detector, "transformer", None)
        if not isinstance(sub, nn.Module):
            raise MfdetrError(
                f"detector {type(detector).__name__} has no `transformer` module to fine-tune (use online.finetune=all)"
            )
        yield from ((f"transformer.{n}", p) for n, p in sub.named_parameters())
        return
    yield from detector.named_parameters()


class FineTuned(nn.Module):
    """MaskNet plus the (partly) unfrozen detector it reads; see the module doc.

    Args:
        masknet: the mask network, or the :class:`~mfdetr.masknet.positives.PositivesOnly` training module
            around it (then the loop passes the targets and MaskNet runs on the positives only).
        detector: the detector (a ``FrozenDetr``); the parameters ``mode`` selects get gradients.
        mode: ``transformer`` or ``all``.
        detector_lr_mult: the detector group's ``lr_scale``.
        detector_step: the online :class:`~mfdetr.engine.online.DetectorStep` that runs the detector
            with gradients in :meth:`forward`.
    """

    def __init__(
        self,
        masknet: nn.Module,
        detector: nn.Module,
        *,
        mode: str,
        detector_lr_mult: float = 0.1,
        detector_step: Any = None,
    ) -> None:
        super().__init__()
        if mode == "none":
            raise ValueError("FineTuned needs a fine-tuning mode (transformer or all)")
        self.masknet = masknet
        self.detector = detector
        self.mode = mode
        self.detector_lr_mult = float(detector_lr_mult)
        self.step: Any = detector_step  # the online DetectorStep that runs the detector
        detector.requires_grad_(False)
        self.tuned = [n for n, p in finetuned_parameters(detector, mode)]
        for _, p in finetuned_parameters(detector, mode):
            p.requires_grad_(True)
        detector.eval()

    def forward(self, images: Any, targets: Any = None, *, step: int = 0) -> tuple[Any, Any]:
        """Detector (with gradients) then MaskNet (on the positives of ``targets`` when ``masknet`` assigns
        them): ``(masknet_outputs, detector_outputs)``."""
        if self.step is None:
            raise RuntimeError("FineTuned needs the online DetectorStep (detector_step) to run")
        det = self.step.run(images, images.images.device)
        out = self.masknet(det) if targets is None else self.masknet(det, targets, step=step)
        # what MaskNet passes through from the detector (boxes, scores, logits) and the detector outputs
        # the criterion reads are not differentiated by the losses: detached, they do not make DDP
        # (find_unused_parameters) expect gradients for the heads that produced them
        passed = {f: getattr(out, f).detach() for f in ("boxes", "scores", "logits") if hasattr(out, f)}
        return (dataclasses.replace(out, **passed) if passed and dataclasses.is_dataclass(out) else out), _detached(det)

    def train(self, mode: bool = True) -> FineTuned:
        self.training = mode
        self.masknet.train(mode)
        self.detector.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """MaskNet's trainable parameters at the scheduled lr, the fine-tuned detector's at ``detector_lr_mult``."""
        det = dict(self.detector.named_parameters())
        return [
            {"params": [p for p in self.masknet.parameters() if p.requires_grad], "lr_scale": 1.0},
            {"params": [det[n] for n in self.tuned], "lr_scale": self.detector_lr_mult},
        ]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        out = {MASKNET_PREFIX + k: v for k, v in self.masknet.state_dict().items()}
        det = self.detector.state_dict(keep_vars=False)
        out.update({DETECTOR_PREFIX + n: det[n] for n in self.tuned})
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        masknet_sd, detector_sd = split_state(state_dict)
        want = set(self.tuned)
        if set(detector_sd) != want:
            missing, extra = sorted(want - set(detector_sd)), sorted(set(detector_sd) - want)
            raise RuntimeError(
                f"fine-tuned detector tensors do not match (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        self.masknet.load_state_dict(masknet_sd, strict=strict)
        load_finetuned_detector(self.detector, detector_sd)
        return None


def _detached(det: Any) -> Any:
    return det.map(torch.Tensor.detach)


def is_finetuned_state(state: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``model`` state comes from a fine-tuning run (holds detector tensors)."""
    return any(k.startswith(DETECTOR_PREFIX) for k in state)


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(masknet_state, detector_state)`` of a fine-tuning run's ``model`` state (prefixes removed);
    a plain MaskNet state comes back unchanged with an empty detector part."""
    if not is_finetuned_state(state):
        return dict(state), {}
    m = {k[len(MASKNET_PREFIX) :]: v for k, v in state.items() if k.startswith(MASKNET_PREFIX)}
    d = {k[len(DETECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
    return m, d


def load_finetuned_detector(detector: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Overwrite the detector tensors a fine-tuning run trained (names and shapes must exist)."""
    own = detector.state_dict()
    bad = [n for n, t in tensors.items() if n not in own or tuple(own[n].shape) != tuple(t.shape)]
    if bad:
        raise MfdetrError(
            f"the checkpoint's fine-tuned detector tensors do not fit this detector "
            f"(e.g. {bad[0]!r}); was it trained with another --detector?"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)


__all__ = [
    "DETECTOR_PREFIX",
    "FINETUNE_MODES",
    "FineTuned",
    "MASKNET_PREFIX",
    "finetuned_parameters",
    "is_finetuned_state",
    "load_finetuned_detector",
    "split_state",
]
