"""The frozen-detector base class: one ``detect`` / ``predict`` for every DETR family.

A family (DINO, H-Deformable-DETR) subclasses :class:`FrozenDetr` and implements only
:meth:`FrozenDetr.forward_detr`, returning a :class:`DetrForward` (all queries' final logits, boxes
and head-feeding hidden states, the encoder memory after the requested layers, the level geometry
and C1). Everything the rest of mfdetr sees — the :class:`~mfdetr.contracts.DetectorOutput` contract
(top-K queries by max sigmoid class score), the official box-AP post-processing, freezing — lives here
once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mfdetr.contracts import DetectorOutput, DetectorPreset, ImageBatch
from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.detectors.common.postprocess import Detections, postprocess_detections
from mfdetr.errors import MfdetrError


@dataclass
class DetrForward:
    """Raw outputs of one forward pass over a padded batch (Q = all queries of the family).

    - ``logits`` [B, Q, C], ``boxes`` [B, Q, 4] normalised cxcywh — final decoder layer;
    - ``hs`` [B, Q, d] — the hidden states that fed those heads (DINO: ``decoder.norm`` output);
    - ``enc_memory`` {layer (1-based): [B, S, d]} — encoder output after the requested layers;
    - ``levels`` — flattened level geometry (shapes, masks, valid ratios);
    - ``level_masks`` — [B, H_l, W_l] bool per level (True at padding);
    - ``c1`` [B, C1, H/4, W/4] — backbone stage 0, before any projection;
    - ``aux`` — family extras for tests/equivalence (per-layer hidden states, references, ...).
    """

    logits: Tensor
    boxes: Tensor
    hs: Tensor
    enc_memory: dict[int, Tensor]
    levels: FlatLevels
    level_masks: list[Tensor]
    c1: Tensor
    aux: dict[str, object] = field(default_factory=dict)


class FrozenDetr(nn.Module):
    """Base of the frozen DETR-family detectors (implements :class:`~mfdetr.contracts.FrozenDetector`).

    Subclasses set ``preset`` and implement :meth:`forward_detr`. :meth:`freeze` puts the model in
    ``eval()`` with ``requires_grad_(False)``; builders call it (the detector is frozen on purpose).
    """

    preset: DetectorPreset
    num_encoder_layers: int
    num_select: int = 300

    def forward_detr(self, images: Tensor, pad_mask: Tensor, *, enc_layers: Sequence[int] = ()) -> DetrForward:
        """Run the detector on ``images`` [B, 3, H, W] with ``pad_mask`` [B, H, W] (True at padding)."""
        raise NotImplementedError

    def forward(self, images: Tensor, pad_mask: Tensor) -> DetrForward:
        return self.forward_detr(images, pad_mask)

    def freeze(self) -> FrozenDetr:
        self.eval()
        self.requires_grad_(False)
        return self

    def _check_enc_layers(self, enc_layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(x) for x in enc_layers)
        bad = [x for x in layers if not 1 <= x <= self.num_encoder_layers]
        if not layers or bad:
            raise MfdetrError(
                f"enc_layers must be 1-based encoder layers in 1..{self.num_encoder_layers}, got {list(enc_layers)}"
            )
        return layers

    def detect(
        self, batch: ImageBatch, *, topk: int = 100, enc_layers: Sequence[int] = (4,), grad: bool = False
    ) -> DetectorOutput:
        """Top-``topk`` queries by max sigmoid class score (descending) and the encoder maps.

        Returns a validated :class:`DetectorOutput`: ``queries`` are the final (normed) hidden states
        that feed the heads, ``enc_maps[l]`` the encoder memory after layer ``l`` (1-based) per level,
        ``c1`` backbone stage 0, ``level_valid_hw`` the valid rows/cols of every level mask.
        Runs under ``torch.inference_mode`` unless ``grad`` (fine-tuning the detector, Table 11): then
        the outputs carry gradients to every parameter with ``requires_grad``; the selection of the
        top-``topk`` queries itself is not differentiable.
        """
        layers = self._check_enc_layers(enc_layers)
        device = next(self.parameters()).device
        with torch.enable_grad() if grad else torch.inference_mode():
            out = self.forward_detr(batch.images.to(device), batch.pad_mask.to(device), enc_layers=layers)
            nq = out.logits.shape[1]
            if not 0 < topk <= nq:
                raise MfdetrError(f"topk must be in 1..{nq} (the detector's query count), got {topk}")
            scores = out.logits.sigmoid().amax(-1)
            idx = scores.topk(topk, dim=1, sorted=True).indices  # [B, K] descending

            def take(t: Tensor) -> Tensor:
                return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))

            valid_hw = torch.stack(
                [torch.stack([(~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)], -1) for m in out.level_masks], 1
            )
            result = DetectorOutput(
                queries=take(out.hs),
                boxes=take(out.boxes),
                logits=take(out.logits),
                enc_maps={layer: out.levels.unflatten(out.enc_memory[layer]) for layer in layers},
                c1=out.c1,
                input_hw=batch.input_hw.to(torch.long).cpu(),
                orig_hw=batch.orig_hw.to(torch.long).cpu(),
                level_valid_hw=valid_hw.to(torch.long).cpu(),
            )
        return result.validate()

    def predict(self, batch: ImageBatch, *, num_select: int | None = None) -> list[Detections]:
        """Official post-processing for box AP: top-``num_select`` (query × class) per image, boxes
        xyxy in original pixels, category ids through the preset's ``class_to_category`` map."""
        device = next(self.parameters()).device
        with torch.inference_mode():
            out = self.forward_detr(batch.images.to(device), batch.pad_mask.to(device))
            return postprocess_detections(
                out.logits,
                out.boxes,
                batch.orig_hw,
                num_select=num_select or self.num_select,
                class_to_category=self.preset.class_to_category,
            )
