"""Typed architecture config of the mask network (the ``[masknet]`` section of a recipe).

Defaults are the paper's final system for H-DETR + R50 (Tables 2-5, 10, 12, 14, 15): deformable
image feature encoder ×2, deformable box feature encoder ×2 after a channel mapper to 128 dims,
query feature encoder FFN + box-to-object attention, dot-product mask head, neck on C1, mask scoring,
RoIAlign size S = 32, encoder layer 4. (For ``dino_focal`` the paper uses 3 image-encoder layers,
Table 16: ``image_encoder.layers=3``.) The loss options (point sampling, ...) live in the loss
config (``mfdetr.masknet.criterion``), not here.

The training-free baseline of eq. 1-4 (Table 1) is :func:`baseline_config`: no trainable part at all.

Every field is plain data (TOML-compatible, :func:`mfdetr.config.from_dict`); the detector-dependent
numbers (``d``, level strides, C1 channels) are NOT part of this config: they come from the cache
manifest / detector preset and are passed to :func:`mfdetr.masknet.build_masknet`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mfdetr.config import apply_overrides, from_dict, load_toml
from mfdetr.errors import MfdetrError
from mfdetr.masknet.blocks import check_block_name

#: the name of a registered encoder block kind (:func:`mfdetr.masknet.blocks.block_names`), checked on construction
BlockType = str


@dataclass
class NeckConfig:
    """Neck on C1 (eq. 14): ``C1 = GN(PWConv(C1))``, C1 channels → d. Table 12: +0.07 M."""

    enabled: bool = True
    groups: int = 32


@dataclass
class ImageEncoderConfig:
    """Image feature encoder F_e on the cached encoder maps (eq. 5-8, Table 2).

    ``block`` is a registered kind (:mod:`mfdetr.masknet.blocks`): ``deformable``: multi-scale
    deformable encoder layers on all levels (eq. 6; MSDeformAttn → LN → FFN(GELU) → LN, post-norm,
    sine positional + learned level embeddings as Deformable DETR); ``swin``: Swin blocks (W-MSA,
    shifted windows in every second block) on E_1 (eq. 7); ``convnext``: ConvNeXt blocks (DWConv k×k
    → LN → FFN, layer scale) on E_1 (eq. 8). ``layers = 0`` disables the encoder.
    """

    block: BlockType = "deformable"
    layers: int = 2
    heads: int = 8
    points: int = 4
    ffn_ratio: float = 4.0
    # 16 reproduces Table 2's Swin #params (0.80/1.59/2.39 M: rel.-pos. table 31²·8 per block)
    swin_window: int = 16
    convnext_kernel: int = 7
    level_embed: bool = True

    def __post_init__(self) -> None:
        check_block_name(self.block)


@dataclass
class BoxEncoderConfig:
    """Box feature encoder F_b on the RoI features R_i (eq. 9, Tables 3-4).

    ``dim`` is the channel mapper's output D (Table 4: 64/96/128/256). The mapper is a Linear d → D
    applied to F before RoIAlign (the paper maps F's channels); ``dim = None`` or ``dim = d`` means
    no mapper. The deformable block is single-level over the S×S RoI map with a learned S×S
    positional embedding (the +0.26 M of Table 3's first layer at d = 256); Swin and ConvNeXt blocks
    carry no such embedding (Table 3's Swin/ConvNeXt rows).
    """

    block: BlockType = "deformable"
    layers: int = 2
    dim: int | None = 128
    heads: int = 8
    points: int = 4
    ffn_ratio: float = 4.0
    swin_window: int = 8
    convnext_kernel: int = 7

    def __post_init__(self) -> None:
        check_block_name(self.block)


@dataclass
class QueryEncoderConfig:
    """Query feature encoder (eq. 10-11, Table 5): any combination of object-to-object self-attention
    (``o2o``, across the K queries of an image), box-to-object cross-attention (``b2o``, query i
    attends to its own R_i) and an FFN, applied in that order, each residual + post-LayerNorm."""

    ffn: bool = True
    o2o: bool = False
    b2o: bool = True
    heads: int = 8
    ffn_ratio: float = 2.0


@dataclass
class MaskHeadConfig:
    """Mask head (Table 14): ``dot`` = q_i · R_i per RoI pixel (eq. 4); ``segmenter`` = Segmenter-style
    head (linear projections of patches and query, LayerNorm, L2-normalised product)."""

    kind: Literal["dot", "segmenter"] = "dot"


@dataclass
class MaskScoringConfig:
    """Mask scoring head (eq. 12-13): iou_i = MLP(Flatten(Conv(Cat(M_i, R_i)))), sigmoid → [0, 1].

    ``convs`` 3×3 stride-2 convolutions of ``channels`` channels (S=32 → 4×4), adaptive-average-pooled
    to ``pool``×``pool``, flattened, then an MLP with ``fc_layers`` hidden layers of ``fc_dim``.
    The default lands at 0.72 M params (Table 12: +0.73 M)."""

    enabled: bool = True
    channels: int = 128
    convs: int = 3
    pool: int = 4
    fc_dim: int = 128
    fc_layers: int = 2
    detach_mask: bool = True


@dataclass
class MaskNetConfig:
    """Architecture of the mask network.

    Args:
        num_queries: K, how many of the (score-sorted) detector queries to segment (≤ cached K).
        enc_layer: which cached encoder layer's maps to use (1-based; Table 15: layer 4 of 6).
        roi: RoIAlign the features per box (eq. 3-4); ``False`` = full-image dot product (eq. 1,
            training-free baseline only): mask logits on the stride-4 image grid.
        roi_size: RoIAlign output size S (Table 10: 16/32/64).
        roi_sampling_ratio: RoIAlign sampling points per bin side (0 = adaptive); 2 as torchvision's
            Mask R-CNN mask pooler (bounded cost for large boxes).
        fuse_c1: F = C1 + up(E_1) (eq. 1/5); ``False`` = F = up(E_1).
        checkpoint_tokens: activation checkpointing of the deformable encoder layers (image and box
            encoders) in training: each layer updates its tokens in chunks of this many and recomputes a
            chunk in the backward pass instead of keeping its activations. Same results and
            parameters; the layers' activation memory drops to about one chunk's for about one more
            forward pass of compute. 0 = off (keep every activation).
    """

    num_queries: int = 100
    enc_layer: int = 4
    roi: bool = True
    roi_size: int = 32
    roi_sampling_ratio: int = 2
    fuse_c1: bool = True
    checkpoint_tokens: int = 0
    neck: NeckConfig = field(default_factory=NeckConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    box_encoder: BoxEncoderConfig = field(default_factory=BoxEncoderConfig)
    query_encoder: QueryEncoderConfig = field(default_factory=QueryEncoderConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    mask_scoring: MaskScoringConfig = field(default_factory=MaskScoringConfig)


def baseline_config(*, roi: bool = True, fuse_c1: bool = True, roi_size: int = 32) -> MaskNetConfig:
    """The training-free baseline of eq. 1-4 (Table 1): no parameters; scores by eq. 2."""
    return MaskNetConfig(
        roi=roi,
        roi_size=roi_size,
        fuse_c1=fuse_c1,
        neck=NeckConfig(enabled=False),
        image_encoder=ImageEncoderConfig(layers=0),
        box_encoder=BoxEncoderConfig(layers=0, dim=None),
        query_encoder=QueryEncoderConfig(ffn=False, o2o=False, b2o=False),
        mask_head=MaskHeadConfig(kind="dot"),
        mask_scoring=MaskScoringConfig(enabled=False),
    )


def _masknet_table(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The mask network's table of a recipe: ``[masknet]``, a sweep's ``[base.masknet]``, or the file itself."""
    if "masknet" in data:
        return data["masknet"]
    base = data.get("base")
    if isinstance(base, Mapping) and "masknet" in base:
        return base["masknet"]
    return data


def recipe_detector(data: Mapping[str, Any]) -> str | None:
    """The detector preset a recipe names (``detector = ...`` at the top, in ``[data]`` or ``[sweep]``)."""
    for table in (data, data.get("data"), data.get("sweep")):
        if isinstance(table, Mapping) and isinstance(table.get("detector"), str):
            return str(table["detector"])
    return None


def load_masknet_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> MaskNetConfig:
    """A :class:`MaskNetConfig` from a TOML recipe (its ``[masknet]`` table, a sweep's
    ``[base.masknet]``, or a file holding only the mask network's keys) plus ``masknet.key=value``
    overrides (the ``masknet.`` prefix is optional). No file: the defaults (the paper's final system)."""
    data: dict[str, Any] = {}
    where = "masknet"
    if path is not None:
        data = dict(_masknet_table(load_toml(path)))
        where = f"{path}: masknet"
    ovs = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("masknet."):
            item = item.strip()[len("masknet.") :]
        elif "=" in item and key.split(".", 1)[0] not in {f.name for f in fields(MaskNetConfig)}:
            raise MfdetrError(f"override {item!r} is not a masknet.* key")
        ovs.append(item)
    return from_dict(MaskNetConfig, apply_overrides(data, ovs), where=where)


def _err(msg: str) -> MfdetrError:
    return MfdetrError(f"masknet config: {msg}")


def check_masknet_config(cfg: MaskNetConfig, *, d_model: int, level_strides: Sequence[int], c1_channels: int) -> int:
    """Check that ``cfg`` is consistent and fits a detector of width ``d_model``, encoder levels of
    ``level_strides`` and C1 of ``c1_channels`` channels (:class:`MfdetrError` naming the keys otherwise);
    return the box branch's width D."""
    strides = tuple(level_strides)
    if not strides or strides[0] % 4:
        raise _err(f"the highest-resolution encoder level must have a stride multiple of 4, got {strides}")
    if cfg.num_queries < 1:
        raise _err(f"num_queries must be ≥ 1, got {cfg.num_queries}")
    if cfg.enc_layer < 1:
        raise _err(f"enc_layer is 1-based, got {cfg.enc_layer}")
    if cfg.checkpoint_tokens < 0:
        raise _err(f"checkpoint_tokens must be ≥ 0 (0 = off), got {cfg.checkpoint_tokens}")
    if cfg.roi_size < 1:
        raise _err(f"roi_size must be ≥ 1, got {cfg.roi_size}")
    ie, be, qe, ms = cfg.image_encoder, cfg.box_encoder, cfg.query_encoder, cfg.mask_scoring
    for name, n in (("image_encoder.layers", ie.layers), ("box_encoder.layers", be.layers)):
        if n < 0:
            raise _err(f"{name} must be ≥ 0, got {n}")
    box_dim = d_model if be.dim is None else be.dim
    if cfg.neck.enabled and not cfg.fuse_c1:
        raise _err("neck.enabled=true needs fuse_c1=true (the neck works on C1)")
    if cfg.fuse_c1 and not cfg.neck.enabled and c1_channels != d_model:
        raise _err(
            f"without the neck, C1's channels ({c1_channels}) must equal d ({d_model}) to fuse "
            "C1 + up(E); set neck.enabled=true or fuse_c1=false"
        )
    if not cfg.roi:
        bad = [
            n
            for n, on in (
                ("box_encoder.layers>0", be.layers > 0),
                ("box_encoder.dim≠d", box_dim != d_model),
                ("query_encoder.b2o", qe.b2o),
                ("mask_scoring.enabled", ms.enabled),
                ("mask_head.kind=segmenter", cfg.mask_head.kind != "dot"),
            )
            if on
        ]
        if bad:
            raise _err(f"roi=false (full-image baseline) cannot use {', '.join(bad)}")
    for name, dim, heads in (
        ("image_encoder", d_model, ie.heads),
        ("box_encoder", box_dim, be.heads),
        ("query_encoder", d_model, qe.heads),
    ):
        if heads < 1 or dim % heads:
            raise _err(f"{name}.heads={heads} must divide its width {dim}")
    return box_dim
