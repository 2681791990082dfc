"""Two-stage encoder proposals (``gen_encoder_output_proposals`` of DINO / Deformable DETR).

Every encoder token becomes a proposal box centred on its pixel, ``(i + 0.5) / valid_size``, with
``w = h = 0.05 · 2^level``. Proposals are kept as logits; a proposal is valid only when all four
coordinates lie in (0.01, 0.99). Padded or invalid tokens get ``+inf`` proposals and zeroed memory.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mfdetr.ops import SpatialShapes, level_shapes


def gen_encoder_output_proposals(
    memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes
) -> tuple[Tensor, Tensor]:
    """Proposals for all tokens.

    Args:
        memory: [B, S, d] encoder output.
        padding_mask: [B, S] True at padding tokens.
        spatial_shapes: [L, 2] (H_l, W_l).

    Returns:
        ``(output_memory [B, S, d], proposals [B, S, 4])`` — memory zeroed at padded/invalid tokens;
        proposals as unnormalised logits (inverse sigmoid) of cxcywh, ``+inf`` where invalid.
    """
    bsz = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        m = padding_mask[:, start : start + h * w].view(bsz, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([gx, gy], -1)  # [h, w, 2] (x, y)
        scale = torch.stack([valid_w, valid_h], -1).view(bsz, 1, 1, 2).to(torch.float32)
        grid = (grid[None] + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * 2.0**lvl)
        proposals.append(torch.cat([grid, wh], -1).view(bsz, -1, 4))
        start += h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    props = props.masked_fill(padding_mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    out = memory.masked_fill(padding_mask[..., None], 0.0).masked_fill(~valid, 0.0)
    return out, props


def select_proposals(
    memory: Tensor,
    padding_mask: Tensor,
    spatial_shapes: SpatialShapes,
    *,
    enc_output: nn.Module,
    enc_output_norm: nn.Module,
    class_head: nn.Module,
    bbox_head: nn.Module,
    k: int,
    score: Literal["max", "first"],
) -> Tensor:
    """Two-stage query selection: the top-``k`` encoder tokens as initial boxes.

    ``out = enc_output_norm(enc_output(masked memory))``; a token's score is its **max** class
    logit (DINO) or its class-**0** logit (Deformable DETR / H-DETR, ``enc_outputs_class[..., 0]``);
    the box of a token is ``bbox_head(out) + proposal``.

    Args:
        memory: [B, S, d]; padding_mask [B, S]; spatial_shapes [L, 2] (as
            :func:`gen_encoder_output_proposals`).
        class_head, bbox_head: the encoder-output heads.

    Returns:
        [B, k, 4] detached box logits (inverse sigmoid of cxcywh) of the selected tokens, best first.
    """
    out, proposals = gen_encoder_output_proposals(memory, padding_mask, spatial_shapes)
    out = enc_output_norm(enc_output(out))
    logits = class_head(out)
    scores = logits.max(-1).values if score == "max" else logits[..., 0]
    if scores.shape[1] < k:
        raise ValueError(f"{scores.shape[1]} encoder tokens < {k} queries: image too small")
    idx = torch.topk(scores, k, dim=1)[1]
    coords = bbox_head(out) + proposals
    return torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4)).detach()
