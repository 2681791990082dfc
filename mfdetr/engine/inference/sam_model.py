"""Segment Anything (the optional ``segment-anything`` package) built from its modules and loaded safely.

The model is assembled here from ``segment_anything.modeling`` (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``TwoWayTransformer``, ``Sam``) with the published sizes of ``vit_b``, ``vit_l`` and
``vit_h`` (:data:`SAM_SPECS`). The user's weights file is read with :func:`safe_torch_load`
(``weights_only=True``: tensors and plain data only) and loaded strictly; the package's own builder is
never used, since it unpickles the file without that restriction. Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mfdetr.engine.checkpoint import load_weights, safe_torch_load
from mfdetr.errors import MfdetrError

__all__ = ["SAM_EXTRA", "SAM_SPECS", "SamSpec", "build_sam_model", "import_sam", "load_sam", "read_sam_state"]

SAM_EXTRA = 'the SAM baseline needs the optional package segment-anything: pip install -c constraints.txt -e ".[sam]"'
PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's input normalisation (RGB, 0-255)
PIXEL_STD = (58.395, 57.12, 57.375)
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class SamSpec:
    """The sizes of one SAM model (the published models differ only in their image encoder)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024  # the long side the image is resized to (and padded square)
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


SAM_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)
    ),
    "vit_l": SamSpec(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamSpec(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
}


def import_sam() -> tuple[Any, Any, Any]:
    """``(segment_anything.modeling, ResizeLongestSide, SamPredictor)``, or a one-line error naming the extra."""
    try:
        from segment_anything import modeling
        from segment_anything.predictor import SamPredictor
        from segment_anything.utils.transforms import ResizeLongestSide
    except ImportError:
        raise MfdetrError(SAM_EXTRA) from None
    return modeling, ResizeLongestSide, SamPredictor


def build_sam_model(spec: SamSpec) -> torch.nn.Module:
    """A randomly initialised ``segment_anything.modeling.Sam`` of the sizes ``spec`` gives (eval mode)."""
    m, _, _ = import_sam()
    grid = spec.image_size // spec.patch_size
    encoder = m.ImageEncoderViT(
        depth=spec.encoder_depth,
        embed_dim=spec.encoder_embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_num_heads,
        patch_size=spec.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(spec.encoder_global_attn_indexes),
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    )
    prompt = m.PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=spec.mask_in_chans,
    )
    transformer = m.TwoWayTransformer(
        depth=spec.decoder_depth,
        embedding_dim=spec.prompt_embed_dim,
        mlp_dim=spec.decoder_mlp_dim,
        num_heads=spec.decoder_num_heads,
    )
    decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=spec.iou_head_depth,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    sam = m.Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def read_sam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a SAM weights file (``weights_only`` load); anything else is a one-line error."""
    obj = safe_torch_load(path)
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        what = f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else "a dict that is not name → tensor"
        raise MfdetrError(
            f"not a SAM state dict (holds {what}; expected the released weights, e.g. sam_vit_h_4b8939.pth)", path=path
        )
    if _PATCH_KEY not in obj:
        raise MfdetrError(f"not a SAM state dict (no {_PATCH_KEY!r} among its {len(obj)} tensors)", path=path)
    return dict(obj)


def _encoder_size(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(embedding width, number of blocks) of the image encoder a state dict holds."""
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    return int(state[_PATCH_KEY].shape[0]), len(blocks)


def load_sam(
    path: str | Path, model: str, *, device: torch.device | str = "cpu", specs: Mapping[str, SamSpec] | None = None
) -> torch.nn.Module:
    """SAM ``model`` (a name in ``specs``, default :data:`SAM_SPECS`) with the weights in ``path``, strictly
    loaded, in eval mode on ``device``. Weights of another SAM size name the ``--sam-model`` they fit."""
    specs = SAM_SPECS if specs is None else specs
    if model not in specs:
        raise MfdetrError(f"unknown --sam-model {model!r} (choose from {', '.join(specs)})")
    import_sam()
    state = read_sam_state(path)
    spec = specs[model]
    width, depth = _encoder_size(state)
    if (width, depth) != (spec.encoder_embed_dim, spec.encoder_depth):
        fits = [n for n, s in specs.items() if (s.encoder_embed_dim, s.encoder_depth) == (width, depth)]
        hint = f"pass --sam-model {fits[0]}" if fits else "not a published SAM size"
        raise MfdetrError(
            f"weights hold a SAM image encoder of width {width} with {depth} blocks, --sam-model "
            f"{model} has width {spec.encoder_embed_dim} with {spec.encoder_depth} blocks ({hint})",
            path=path,
        )
    sam = build_sam_model(spec)
    load_weights(sam, state, path=path, what=f"SAM {model}")
    return sam.to(device).eval()
