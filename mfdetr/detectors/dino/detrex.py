"""detrex (IDEA-Research/detrex ``projects/dino``, ``projects/h_deformable_detr``) DINO and
H-Deformable-DETR checkpoints: recognised by their key layout and loaded strictly through a rename table,
like the official formats.

Facts from detrex ``projects/dino/modeling/{dino,dino_transformer}.py``, ``detrex/layers`` and
``projects/dino/configs/models/dino_r50.py``; the backbone is detectron2's ResNet:

- backbone ``backbone.stem.conv1`` / ``backbone.res{2..5}.{j}.conv{1,2,3}`` / ``.shortcut``, each conv
  holding its FrozenBN as ``.norm``; the input projections are ``ChannelMapper`` ``neck.convs.{i}`` and
  ``neck.extra_convs.{k}`` (``.conv`` + ``.norm``; the first extra conv takes the last backbone map);
- layers are ``BaseTransformerLayer``: ``attentions.{0,1}`` (decoder self-attention wraps
  ``nn.MultiheadAttention`` as ``.attn``), ``ffns.0.layers.{0.0,1}`` and ``norms.{i}`` in operation
  order (decoder: self-attention, norm, cross-attention, norm, FFN, norm);
- ``transformer.level_embeds``; heads are per layer (not shared) with one more pair for the two-stage
  encoder output (``class_embed.{L}``, ``bbox_embed.{L}`` with L decoder layers), aliased under
  ``transformer.decoder``; ``label_enc`` has ``num_classes`` rows;
- map positions: ``PositionEmbeddingSine`` temperature 10000, offset −0.5 (official DINO: 20, none);
  ``inverse_sigmoid`` eps 1e-3 and the top-300 post-processing as the official DINO.

H-Deformable-DETR (``h_deformable_detr.py``, ``h_deformable_transformer.py``, configs ``models/
h_deformable_detr_r50.py``): the same backbone, neck and layer names; ``query_embedding`` (one-to-one +
one-to-many rows; 300 + 1500 in every detrex config); heads named as the official H-DETR (``dec_layers
+ 1`` pairs, aliased under ``transformer.decoder``; the decoder's alias exists only with box refinement);
positions as the official H-DETR; ``inverse_sigmoid`` eps 1e-3 (official 1e-5); top-300.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mfdetr.detectors.common.checkpoint import (
    CheckpointFormat,
    load_state_dict_strict,
    read_checkpoint,
    remap_state_dict,
    unwrap_state_dict,
)
from mfdetr.errors import MfdetrError

#: what a detrex DINO checkpoint does not say and detrex's DINO configs all set
DETREX_DINO_ARGS: dict[str, Any] = {
    "nheads": 8,
    "pe_temperatureH": 10000.0,
    "pe_temperatureW": 10000.0,
    "pe_offset": -0.5,
    "dec_pred_class_embed_share": False,
    "dec_pred_bbox_embed_share": False,
    "num_select": 300,
}
#: ... and H-Deformable-DETR (detrex's configs: 300 one-to-one queries, top-300, its inverse_sigmoid)
DETREX_HDETR_ARGS: dict[str, Any] = {
    "nheads": 8,
    "num_queries_one2one": 300,
    "topk": 300,
    "inv_sigmoid_eps": 1e-3,
    "two_stage": True,
    "with_box_refine": True,
    "mixed_selection": True,
    "look_forward_twice": True,
}
#: positional encoding a model must have to run detrex weights
DETREX_POSITION = (10000.0, 10000.0, -0.5)
DETREX_HDETR_EPS = 1e-3


def is_detrex(keys: Any) -> bool:
    """A detrex DINO or H-Deformable-DETR state dict (detrex's ``level_embeds`` and ``neck``)."""
    keys = set(keys)
    return "transformer.level_embeds" in keys and "neck.convs.0.conv.weight" in keys


def is_detrex_dino(keys: Any) -> bool:
    keys = set(keys)
    return is_detrex(keys) and "transformer.tgt_embed.weight" in keys


def is_detrex_hdetr(keys: Any) -> bool:
    keys = set(keys)
    return is_detrex(keys) and "query_embedding.weight" in keys


def _count(keys: Any, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def detrex_dino_format(keys: Any) -> CheckpointFormat:
    """The rename table of a detrex DINO or H-Deformable-DETR state dict with these ``keys`` (ResNet)."""
    keys = list(keys)
    hdetr = is_detrex_hdetr(keys)
    what = "H-Deformable-DETR" if hdetr else "DINO"
    if not any(k.startswith("backbone.stem.conv1.") for k in keys):
        raise MfdetrError(
            f"detrex {what} checkpoint: only detectron2's ResNet backbone (backbone.stem/res2..res5) "
            "is implemented in mfdetr"
        )
    if hdetr and "transformer.enc_output.weight" not in keys:
        raise MfdetrError("detrex H-Deformable-DETR checkpoint without as_two_stage: not implemented in mfdetr")
    if hdetr and not any(k.startswith("transformer.decoder.bbox_embed.") for k in keys):
        raise MfdetrError("detrex H-Deformable-DETR checkpoint without with_box_refine: not implemented in mfdetr")
    n_in = _count(keys, r"^neck\.convs\.(\d+)\.")
    n_extra = _count(keys, r"^neck\.extra_convs\.(\d+)\.")
    n_dec = _count(keys, r"^transformer\.decoder\.layers\.(\d+)\.")
    enc = r"^(transformer\.encoder\.layers\.\d+)\."
    dec = r"^(transformer\.decoder\.layers\.\d+)\."
    heads: list[tuple[str, str | None]] = (
        [(r"^query_embedding\.", "query_embed.")]
        if hdetr
        else [
            (rf"^transformer\.decoder\.(?:class|bbox)_embed\.{n_dec}\.", None),  # alias of the encoder heads below
            (rf"^class_embed\.{n_dec}\.", "transformer.enc_out_class_embed."),
            (rf"^bbox_embed\.{n_dec}\.", "transformer.enc_out_bbox_embed."),
        ]
    )
    rules: list[tuple[str, str | None]] = [
        (r"^backbone\.stem\.conv1\.norm\.", "backbone.0.body.bn1."),
        (r"^backbone\.stem\.conv1\.weight$", "backbone.0.body.conv1.weight"),
        *[(rf"^backbone\.res{i + 2}\.", f"backbone.0.body.layer{i + 1}.") for i in range(4)],
        (r"^(backbone\.0\.body\.layer\d\.\d+)\.conv(\d)\.norm\.", r"\1.bn\2."),
        (r"^(backbone\.0\.body\.layer\d\.\d+)\.shortcut\.norm\.", r"\1.downsample.1."),
        (r"^(backbone\.0\.body\.layer\d\.\d+)\.shortcut\.weight$", r"\1.downsample.0.weight"),
        (r"^neck\.convs\.(\d+)\.conv\.", r"input_proj.\1.0."),
        (r"^neck\.convs\.(\d+)\.norm\.", r"input_proj.\1.1."),
        *[(rf"^neck\.extra_convs\.{k}\.conv\.", f"input_proj.{n_in + k}.0.") for k in range(n_extra)],
        *[(rf"^neck\.extra_convs\.{k}\.norm\.", f"input_proj.{n_in + k}.1.") for k in range(n_extra)],
        (r"^transformer\.level_embeds$", "transformer.level_embed"),
        (enc + r"attentions\.0\.", r"\1.self_attn."),
        (enc + r"norms\.0\.", r"\1.norm1."),
        (enc + r"norms\.1\.", r"\1.norm2."),
        (dec + r"attentions\.0\.attn\.", r"\1.self_attn."),
        (dec + r"attentions\.1\.", r"\1.cross_attn."),
        (dec + r"norms\.0\.", r"\1.norm2."),
        (dec + r"norms\.1\.", r"\1.norm1."),
        (dec + r"norms\.2\.", r"\1.norm3."),
        (r"^(transformer\.(?:en|de)coder\.layers\.\d+)\.ffns\.0\.layers\.0\.0\.", r"\1.linear1."),
        (r"^(transformer\.(?:en|de)coder\.layers\.\d+)\.ffns\.0\.layers\.1\.", r"\1.linear2."),
        *heads,
    ]
    return CheckpointFormat(name=f"IDEA-Research/detrex {what}", renames=tuple(rules))


def to_mfdetr_layout(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detrex state dict renamed to mfdetr's (= the official) names; no key dropped but DINO's
    encoder-head aliases."""
    return remap_state_dict(sd, detrex_dino_format(sd), expected=set())


def load_hdetr_checkpoint(
    model: nn.Module, source: str | Path | Mapping[str, Any], official: CheckpointFormat, *, inv_sigmoid_eps: float
) -> None:
    """Load an official or a detrex H-DETR checkpoint into ``model`` strictly; a detrex file needs a model
    with detrex's ``inverse_sigmoid`` eps."""
    origin = str(source) if isinstance(source, (str, Path)) else "state dict"
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = unwrap_state_dict(obj, origin=origin)
    expected = set(model.state_dict().keys())
    if is_detrex_hdetr(sd):
        if float(inv_sigmoid_eps) != DETREX_HDETR_EPS:
            raise MfdetrError(
                f"{origin}: a detrex H-Deformable-DETR checkpoint (inverse_sigmoid eps 1e-3) does not "
                f"fit this preset (eps {inv_sigmoid_eps:g}): use --detector auto"
            )
        sd = remap_state_dict(sd, detrex_dino_format(sd), expected=expected)
    else:
        sd = remap_state_dict(sd, official, expected=expected)
    load_state_dict_strict(model, sd, origin=origin)


def load_dino_checkpoint(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    official: CheckpointFormat,
    *,
    position: tuple[float, float, float],
) -> None:
    """Load an official or a detrex DINO checkpoint into ``model`` strictly; a detrex file needs a model
    with detrex's positional encoding (``position`` = temperatures H, W and offset of ``model``)."""
    origin = str(source) if isinstance(source, (str, Path)) else "state dict"
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = unwrap_state_dict(obj, origin=origin)
    if is_detrex_dino(sd):
        if tuple(float(x) for x in position) != DETREX_POSITION:
            raise MfdetrError(
                f"{origin}: a detrex DINO checkpoint (map positions: temperature 10000, offset -0.5) "
                f"does not fit this DINO preset (temperature {position[0]:g}, offset {position[2]:g}): "
                "use --detector auto"
            )
        sd = remap_state_dict(sd, detrex_dino_format(sd), expected=set(model.state_dict().keys()))
    else:
        sd = remap_state_dict(sd, official, expected=set(model.state_dict().keys()))
    load_state_dict_strict(model, sd, origin=origin)


__all__ = [
    "DETREX_DINO_ARGS",
    "DETREX_HDETR_ARGS",
    "detrex_dino_format",
    "is_detrex",
    "is_detrex_dino",
    "is_detrex_hdetr",
    "load_dino_checkpoint",
    "load_hdetr_checkpoint",
    "to_mfdetr_layout",
]
