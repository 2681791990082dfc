"""ONNX export of the inference path (``mfdetr export``), with ``torch.onnx.export(dynamo=True)``.

The whole path (:class:`FullGraph`): inputs ``image`` [1, 3, H, W] (the preset's eval preprocessing
applied, no padding) and ``orig_hw`` [1, 2] int64; the frozen detector's ``detect`` (top-K) and the
mask network; outputs as below. H and W are dynamic.

``--masknet-only`` exports the trained mask network over :class:`~mfdetr.contracts.DetectorOutput`
tensors for one image (B = 1, the K queries of the checkpoint's ``num_queries``), with dynamic spatial
sizes: one graph serves every input size. Inputs (in this order):

- ``queries`` [1, K, d], ``boxes`` [1, K, 4] (normalised cxcywh of the input image), ``logits`` [1, K, C];
- ``c1`` [1, C1, ceil(H/4), ceil(W/4)]; ``input_hw``, ``orig_hw`` [1, 2] int64;
- ``level_valid_hw`` [1, L, 2] int64; ``enc_map_<l>`` [1, d, H_l, W_l] per encoder level.

Outputs: ``mask_logits`` [1, K, S, S] (logits on each box's S×S grid), ``scores`` [1, K] (eq. 13:
``c_i × clamp(iou_i, 0, 1)`` with mask scoring, else the detector's ``c_i``), ``labels`` [1, K] int64
(class slot; the checkpoint's category map turns it into a COCO id) and ``boxes_xyxy`` [1, K, 4] in
original-image pixels. Pasting the masks into the image stays outside the graph
(:func:`mfdetr.masknet.paste_masks`).

Everything data-dependent is tensor arithmetic (valid-region masks from ``level_valid_hw``, level
sizes taken from the maps' shapes), so the exported graph carries symbolic sizes, not the example's.
The MaskNet is loaded by :func:`mfdetr.engine.inference.predict.load_masknet_checkpoint`, as ``mfdetr predict`` does.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfdetr.contracts import DetectorOutput, DetectorPreset
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_path

__all__ = [
    "EXPORT_MODULES",
    "OPSET",
    "ExportJob",
    "FullGraph",
    "MaskNetGraph",
    "export_full",
    "export_masknet",
    "masknet_example_inputs",
    "masknet_input_names",
    "require_onnx",
    "run_export",
]

#: the ONNX opset the graphs are written with (the newest the exporter's translation tables target)
OPSET = 18
#: the packages of the ``export`` extra
EXPORT_MODULES = ("onnx", "onnxruntime", "onnxscript")
MASKNET_OUTPUTS = ("mask_logits", "scores", "labels", "boxes_xyxy")


def require_onnx(modules: Sequence[str] = EXPORT_MODULES) -> None:
    """Raise a one-line :class:`MfdetrError` when a package of the ``export`` extra is missing."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MfdetrError(
                f"ONNX export needs the {name!r} package (the 'export' extra): "
                "pip install -c constraints.txt -e '.[export]'"
            ) from None


class MaskNetGraph(nn.Module):
    """The mask network over flat DetectorOutput tensors of one image (the exported signature)."""

    def __init__(self, masknet: nn.Module) -> None:
        super().__init__()
        self.masknet = masknet

    def forward(
        self,
        queries: Tensor,
        boxes: Tensor,
        logits: Tensor,
        c1: Tensor,
        input_hw: Tensor,
        orig_hw: Tensor,
        level_valid_hw: Tensor,
        enc_maps: list[Tensor],
    ) -> tuple[Tensor, ...]:
        det = DetectorOutput(
            queries=queries,
            boxes=boxes,
            logits=logits,
            enc_maps={self.masknet.enc_layer: list(enc_maps)},
            c1=c1,
            input_hw=input_hw,
            orig_hw=orig_hw,
            level_valid_hw=level_valid_hw,
        )
        return masknet_outputs(self.masknet, det)


def masknet_outputs(masknet: nn.Module, det: DetectorOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mask_logits, scores, labels, boxes_xyxy)`` of the exported graphs (see the module doc)."""
    out = masknet(det)
    c = out.scores
    scores = c if out.iou_pred is None else c * out.iou_pred.clamp(0, 1)
    cx, cy, w, h = out.boxes.unbind(-1)
    xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)
    oh, ow = det.orig_hw[:, 0].to(xyxy.dtype), det.orig_hw[:, 1].to(xyxy.dtype)
    xyxy = xyxy * torch.stack((ow, oh, ow, oh), -1)[:, None]
    return out.mask_logits, scores, out.logits.argmax(-1), xyxy


class FullGraph(nn.Module):
    """Frozen detector → mask network on one preprocessed image (the whole-path signature).

    Inputs: ``image`` [1, 3, H, W] (the preset's eval preprocessing applied: resized, normalised, no
    padding) and ``orig_hw`` [1, 2] int64 (the original image size); outputs as :class:`MaskNetGraph`."""

    def __init__(self, detector: nn.Module, masknet: nn.Module, *, topk: int) -> None:
        super().__init__()
        self.detector, self.masknet, self.topk = detector, masknet, topk

    def forward(self, image: Tensor, orig_hw: Tensor) -> tuple[Tensor, ...]:
        from mfdetr.contracts import ImageBatch
        from mfdetr.ops import shapes_tensor

        input_hw = shapes_tensor([(image.shape[-2], image.shape[-1])], image.device)  # symbolic under export
        pad_mask = torch.zeros_like(image[:, 0], dtype=torch.bool)
        batch = ImageBatch(
            images=image, pad_mask=pad_mask, input_hw=input_hw, orig_hw=orig_hw, image_ids=[1], file_names=["image"]
        )
        det = self.detector.detect(batch, topk=self.topk, enc_layers=(self.masknet.enc_layer,))
        return masknet_outputs(self.masknet, det)


def masknet_input_names(levels: int) -> list[str]:
    """The graph's input names (the order of :class:`MaskNetGraph`'s arguments, maps last)."""
    return [
        "queries",
        "boxes",
        "logits",
        "c1",
        "input_hw",
        "orig_hw",
        "level_valid_hw",
        *(f"enc_map_{lvl}" for lvl in range(levels)),
    ]


def masknet_example_inputs(
    preset: DetectorPreset, num_queries: int, height: int, width: int, *, seed: int = 0
) -> tuple[Any, ...]:
    """Random DetectorOutput tensors of one ``height`` × ``width`` input image (the graph's arguments),
    with the canvas of every level exactly the valid size, as the detector gives for one image."""
    g = torch.Generator().manual_seed(seed)
    d, k = preset.hidden_dim, num_queries
    maps = [torch.randn(1, d, -(-height // s), -(-width // s), generator=g) for s in preset.level_strides]
    valid = torch.tensor([[[m.shape[-2], m.shape[-1]] for m in maps]], dtype=torch.long)
    boxes = torch.cat((0.2 + 0.6 * torch.rand(1, k, 2, generator=g), 0.05 + 0.4 * torch.rand(1, k, 2, generator=g)), -1)
    hw = torch.tensor([[height, width]], dtype=torch.long)
    return (
        torch.randn(1, k, d, generator=g),
        boxes,
        torch.randn(1, k, preset.num_classes, generator=g),
        torch.randn(1, preset.c1_channels, -(-height // 4), -(-width // 4), generator=g),
        hw,
        hw.clone(),
        valid,
        maps,
    )


def flat_inputs(args: Sequence[Any]) -> list[Tensor]:
    """The graph's arguments as the exported graph's flat input list."""
    return [*args[:7], *args[7]]


def _masknet_dynamic_shapes(levels: int) -> list[Any]:
    from torch.export import Dim

    spatial = {2: Dim.AUTO, 3: Dim.AUTO}
    return [None, None, None, dict(spatial), None, None, None, [dict(spatial) for _ in range(levels)]]


def export_masknet(
    masknet: nn.Module,
    preset: DetectorPreset,
    out: Path,
    *,
    opset: int = OPSET,
    example_hw: tuple[int, int] | None = None,
) -> Path:
    """Write the mask network's ONNX graph (see the module doc) to ``out``."""
    require_onnx()
    graph = MaskNetGraph(masknet.eval()).eval()
    h, w = example_hw or (preset.preprocessing.short_side, preset.preprocessing.max_size)
    args = masknet_example_inputs(preset, masknet.num_queries, h, w)
    levels = len(preset.level_strides)

    return _export_onnx(
        graph,
        args,
        out,
        what="the mask network",
        opset=opset,
        dynamic_shapes=_masknet_dynamic_shapes(levels),
        input_names=masknet_input_names(levels),
    )


def export_full(
    detector: nn.Module,
    masknet: nn.Module,
    preset: DetectorPreset,
    out: Path,
    *,
    topk: int,
    opset: int = OPSET,
    example_hw: tuple[int, int] | None = None,
) -> Path:
    """Write the whole inference path's ONNX graph (:class:`FullGraph`) to ``out``."""
    from torch.export import Dim

    require_onnx()
    graph = FullGraph(detector.eval(), masknet.eval(), topk=topk).eval()
    h, w = example_hw or (preset.preprocessing.short_side, preset.preprocessing.max_size)
    args = (torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0)), torch.tensor([[h, w]]))

    return _export_onnx(
        graph,
        args,
        out,
        what="the detector and mask network",
        opset=opset,
        dynamic_shapes=[{2: Dim.AUTO, 3: Dim.AUTO}, None],
        input_names=["image", "orig_hw"],
    )


def _export_onnx(
    graph: nn.Module,
    args: tuple[Any, ...],
    out: Path,
    *,
    what: str,
    opset: int,
    dynamic_shapes: Any,
    input_names: list[str],
) -> Path:
    """``torch.onnx.export`` (dynamo) of ``graph`` to ``out``, atomically; a failure is one line naming ``what``."""

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(
                graph,
                args,
                str(tmp),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=list(MASKNET_OUTPUTS),
                verbose=False,
            )
        except Exception as e:
            raise MfdetrError(
                f"ONNX export of {what} failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                path=out,
            ) from e

    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), atomic_path(out, what="ONNX file", shared=True) as tmp:  # a failed export leaves no file
        write(tmp)
    return out


@dataclass(frozen=True)
class ExportJob:
    """What ``mfdetr export`` was asked to do."""

    detector: str
    masknet: Path
    out: Path
    checkpoint: Path | None = None
    masknet_only: bool = False
    opset: int = OPSET


def run_export(job: ExportJob, *, echo: Any = print) -> Path:
    """Run an export job; returns the written ``.onnx`` file."""
    from mfdetr.detectors.registry import get_preset, load_plugins
    from mfdetr.engine.inference.predict import (
        detector_checkpoint,
        load_masknet_checkpoint,
        preset_queries,
    )

    require_onnx()
    if job.out.suffix.lower() != ".onnx":
        raise MfdetrError("the output must be a .onnx file", path=job.out)
    load_plugins()
    preset = get_preset(job.detector)
    loaded = load_masknet_checkpoint(job.masknet, preset=preset, device="cpu")
    if job.masknet_only:
        export_masknet(loaded.model, preset, job.out, opset=job.opset)
        echo(f"wrote {job.out} (opset {job.opset}, mask network over DetectorOutput tensors, dynamic spatial size)")
        return job.out
    from mfdetr.detectors.registry import build_detector

    ckpt = detector_checkpoint(preset, job.checkpoint)
    detector = build_detector(preset.name, checkpoint=ckpt, device="cpu")
    if loaded.detector_tensors:  # a fine-tuning run: its detector tensors replace the checkpoint's
        from mfdetr.engine.finetune import load_finetuned_detector

        load_finetuned_detector(detector, loaded.detector_tensors)
    export_full(
        detector,
        loaded.model,
        preset,
        job.out,
        topk=min(loaded.config.num_queries, preset_queries(preset)),
        opset=job.opset,
    )
    echo(f"wrote {job.out} (opset {job.opset}, detector + mask network, dynamic image size)")
    return job.out
