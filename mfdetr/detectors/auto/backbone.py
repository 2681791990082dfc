"""The backbone of a checkpoint: its kind from the training args (``args.backbone``) and the key layout,
its sizes (widths, depths, heads, window, focal levels) and the stages feeding the encoder from the
tensor shapes. A kind mfdetr does not implement is a one-line error naming it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mfdetr.detectors.backbones.factory import BackboneConfig
from mfdetr.errors import MfdetrError

#: ``args.backbone`` name prefixes → our backbone kind (IDEA-Research/DINO: resnet50, swin_L_384_22k, ...;
#: FocalNet-DINO: focalnet_L_384_22k_fl4; H-Deformable-DETR: resnet50, swin_large, ...)
ARG_KINDS = (("resnet", "resnet"), ("swin", "swin"), ("focalnet", "focalnet"))


def backbone_tensors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's tensors with the ``backbone.0.`` (and H-DETR/torchvision ``body.``) prefix removed."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^backbone\.0\.(?:body\.)?(.*)$", k)
        if m:
            out[m.group(1)] = v
    return out


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found and found != set(range(len(found))):
        raise MfdetrError(f"checkpoint: indices of {pattern!r} are not contiguous: {sorted(found)}")
    return len(found)


def layout_kind(bb: Mapping[str, Tensor]) -> str:
    """The backbone kind its key layout shows."""
    keys = list(bb)
    if any(".modulation.focal_layers." in k for k in keys):
        return "focalnet"
    if any(".attn.relative_position_bias_table" in k for k in keys):
        return "swin"
    if "conv1.weight" in bb and any(k.startswith("layer1.0.") for k in keys):
        return "resnet"
    if "stem.0.weight" in bb and any(k.startswith("stages.0.0.conv1") for k in keys):
        return "resnet_bn"
    if "stem.weight" in bb and "stages.0.weight" in bb:
        return "tiny"
    raise MfdetrError(
        "checkpoint: backbone key layout not recognised (first keys: "
        f"{', '.join(sorted(keys)[:4]) or 'none'}): not a backbone mfdetr implements"
    )


def arg_kind(name: str) -> str:
    """Our kind for an official ``args.backbone`` name."""
    for prefix, kind in ARG_KINDS:
        if name.lower().startswith(prefix):
            return kind
    raise MfdetrError(
        f"args.backbone = {name!r}: backbone not implemented in mfdetr (known: resnet*, swin*, focalnet*)"
    )


def _params(kind: str, bb: Mapping[str, Tensor]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Size params of ``kind`` and the channels of stages 0..3."""
    keys = list(bb)
    if kind == "resnet":
        depths = tuple(_count(keys, rf"^layer{i + 1}\.(\d+)\.") for i in range(4))
        return {"depths": depths}, tuple(int(bb[f"layer{i + 1}.0.conv3.weight"].shape[0]) for i in range(4))
    if kind == "resnet_bn":
        depths = tuple(_count(keys, rf"^stages\.{i}\.(\d+)\.") for i in range(4))
        widths = tuple(int(bb[f"stages.{i}.0.conv1.weight"].shape[0]) for i in range(4))
        return {"widths": widths, "depths": depths}, widths
    if kind == "tiny":
        n = _count(keys, r"^stages\.(\d+)\.weight$")
        widths = tuple(int(bb[f"stages.{i}.weight"].shape[0]) for i in range(n))
        return {"widths": widths}, widths
    embed = int(bb["patch_embed.proj.weight"].shape[0])
    depths = tuple(_count(keys, rf"^layers\.{i}\.blocks\.(\d+)\.") for i in range(4))
    chans = tuple(embed * 2**i for i in range(4))
    if kind == "swin":
        heads, win = [], []
        for i in range(4):
            t = bb[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]
            heads.append(int(t.shape[1]))
            win.append((round(int(t.shape[0]) ** 0.5) + 1) // 2)
        return {"embed_dim": embed, "depths": depths, "num_heads": tuple(heads), "window_size": win[0]}, chans
    levels = _count(keys, r"^layers\.0\.blocks\.0\.modulation\.focal_layers\.(\d+)\.")
    window = int(bb["layers.0.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1])
    return {"embed_dim": embed, "depths": depths, "focal_levels": levels, "focal_windows": window}, chans


def infer_backbone(sd: Mapping[str, Tensor], args: Mapping[str, Any]) -> BackboneConfig:
    """The :class:`BackboneConfig` of a checkpoint (kind: args and key layout must agree; stages feeding
    the encoder: the input channels of the 1×1 ``input_proj`` convs, checked against
    ``args.return_interm_indices`` when stated)."""
    bb = backbone_tensors(sd)
    if not bb:
        raise MfdetrError("checkpoint has no backbone.0.* keys: not a DINO / H-DETR state dict")
    kind = layout_kind(bb)
    if "backbone" in args:
        stated = arg_kind(str(args["backbone"]))
        if stated != kind:
            raise MfdetrError(f"args.backbone = {args['backbone']!r} but the backbone.0.* keys are a {kind} backbone")
    if args.get("dilation"):
        raise MfdetrError("args.dilation = True: a dilated backbone is not implemented in mfdetr")
    params, chans = _params(kind, bb)
    out = []
    for i in range(_count(list(sd), r"^input_proj\.(\d+)\.0\.weight$")):
        w = sd[f"input_proj.{i}.0.weight"]
        if w.shape[-1] != 1:
            break
        if int(w.shape[1]) not in chans:
            raise MfdetrError(
                f"checkpoint key input_proj.{i}.0.weight takes {int(w.shape[1])} channels, no backbone "
                f"stage has them (stages: {list(chans)})"
            )
        out.append(chans.index(int(w.shape[1])))
    if "return_interm_indices" in args and list(args["return_interm_indices"]) != out:
        raise MfdetrError(
            f"args.return_interm_indices = {list(args['return_interm_indices'])} but the input_proj.*.0 "
            f"keys take backbone stages {out}"
        )
    return BackboneConfig(kind=kind, out_indices=tuple(out), params=params)


__all__ = ["backbone_tensors", "infer_backbone", "layout_kind"]
