"""The multi-scale deformable encoder layer (Deformable DETR) and its reference points.

One layer serves the detectors (DINO, H-Deformable-DETR: ReLU FFN under the official key names
``linear1`` / ``linear2``) and the mask network (GELU FFN as an ``ffn`` child, optionally a single
level over a RoI map); the computation is the same post-norm sequence for both::

    x = norm1(src + self_attn(src + pos, ref, src))
    x = norm2(x + ffn(x))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mfdetr.layers.ffn import ACTIVATIONS, FFN, Activation
from mfdetr.ops import MSDeformAttn, SpatialShapes, level_shapes


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: Tensor, valid_wh: Tensor | None = None) -> Tensor:
    """Pixel-centre reference points of every token, per level.

    Args:
        spatial_shapes: [L, 2] (H_l, W_l), or the (H_l, W_l) pairs (symbolic sizes stay symbolic).
        ratios: [B, L, 2] valid ratios (w, h): the valid fraction of each level's canvas.
        valid_wh: [B, L, 2] valid sizes (w, h) in tokens, or ``None``: ``ratio · size`` (the
            detectors' official formula, which derives the valid size from the ratio).

    Returns:
        [B, S, L, 2] (x, y): ``(i + 0.5) / valid_size`` of the token's own level, multiplied by every
        level's valid ratio.
    """
    refs = []
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        # = linspace(0.5, size - 0.5, size), exactly; arange keeps a symbolic size symbolic under torch.export
        ry, rx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5,
            indexing="ij",
        )
        if valid_wh is None:
            ry = ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
            rx = rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        else:
            ry = ry.reshape(-1)[None] / valid_wh[:, None, lvl, 1]
            rx = rx.reshape(-1)[None] / valid_wh[:, None, lvl, 0]
        refs.append(torch.stack((rx, ry), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


@dataclass(frozen=True)
class TokenRows:
    """Some tokens of each image of a batch, as one flat list: token ``token[i]`` of image ``batch[i]``
    ([T] each), grouped by image in batch order, ``counts[b]`` of image b."""

    batch: Tensor
    token: Tensor
    counts: list[int]

    def chunk_counts(self, start: int, stop: int) -> list[int]:
        """``counts`` of the rows ``start:stop``."""
        out, first = [], 0
        for c in self.counts:
            out.append(max(0, min(stop, first + c) - max(start, first)))
            first += c
        return out


class DeformableEncoderLayer(nn.Module):
    """Post-norm multi-scale deformable encoder layer: MSDeformAttn → add → LN → FFN → add → LN.

    Args:
        dim: token width.
        levels: feature levels attended to (1 for a single map, e.g. a RoI).
        heads, points: deformable attention heads and sampling points per head and level.
        ffn_hidden: FFN hidden width.
        activation: the FFN's activation (detectors: ``"relu"``; mask network: ``"gelu"``).
        ffn_names: where the FFN's two linears live: ``"ffn"`` → an :class:`FFN` child (``ffn.fc1``,
            ``ffn.fc2``); ``"linear"`` → ``linear1`` / ``linear2`` on the layer itself (Deformable
            DETR's official key names).

    No dropout: the detectors run frozen and the mask network trains without it.
    """

    def __init__(
        self,
        *,
        dim: int,
        levels: int,
        heads: int,
        points: int,
        ffn_hidden: int,
        activation: Activation = "gelu",
        ffn_names: Literal["ffn", "linear"] = "ffn",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=dim, n_levels=levels, n_heads=heads, n_points=points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn: FFN | None = None
        if ffn_names == "ffn":
            self.ffn = FFN(dim=dim, hidden=ffn_hidden, activation=activation)
        elif ffn_names == "linear":
            self.linear1 = nn.Linear(dim, ffn_hidden)
            self.linear2 = nn.Linear(ffn_hidden, dim)
            self._act = ACTIVATIONS[activation]
        else:
            raise ValueError(f"ffn_names must be 'ffn' or 'linear', got {ffn_names!r}")
        self.norm2 = nn.LayerNorm(dim)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The FFN alone: ``fc2(act(fc1(x)))``."""
        if self.ffn is not None:
            return self.ffn(x)
        return self.linear2(self._act(self.linear1(x)))

    def forward(
        self,
        src: Tensor,
        pos: Tensor | None,
        reference_points: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
        *,
        level_start_index: Tensor | None = None,
        num_out: int | None = None,
        out_rows: TokenRows | None = None,
        checkpoint_tokens: int | None = None,
    ) -> Tensor:
        """Update the tokens.

        Args:
            src: [B, N, dim] tokens of all levels (they are also the values).
            pos: [B or 1, N, dim] positional embedding added to the queries, or ``None``.
            reference_points: [B, N, L, 2]; ``spatial_shapes`` [L, 2] or (H_l, W_l) pairs.
            padding_mask: [B, N] True at padding (masked as values), or ``None``.
            level_start_index: [L] first token of each level (derived from the shapes when absent).
            num_out: compute only the first ``num_out`` tokens' outputs ([B, num_out, dim]); every
                token still serves as a value, so these equal the first rows of the full result.
            out_rows: compute only these tokens' outputs, as one flat list ([T, dim], row i being token
                ``out_rows.token[i]`` of image ``out_rows.batch[i]`` of the full result): no image is
                padded to the others' count.
            checkpoint_tokens: when a gradient is recorded, update the output tokens in chunks of this
                many, each recomputed in the backward pass instead of keeping its activations (the
                values are projected once and kept): the layer's activation memory is that of one
                chunk, for about one more forward pass of compute. Same results.

        Returns:
            [B, N (or num_out), dim], or [T, dim] with ``out_rows``.
        """
        x, p, ref = src, pos, reference_points
        counts = None
        if num_out is not None:
            x, ref = src[:, :num_out], reference_points[:, :num_out]
            p = None if pos is None else pos[:, :num_out]
        elif out_rows is not None:
            bi, ti, counts = out_rows.batch, out_rows.token, out_rows.counts
            x, ref = src[bi, ti][None], reference_points[bi, ti][None]
            p = None if pos is None else pos[bi if pos.shape[0] > 1 else 0, ti][None]
        value = self.self_attn.project_values(src, padding_mask)
        if not checkpoint_tokens or not torch.is_grad_enabled():
            out = self._update(x, p, ref, value, spatial_shapes, counts)
            return out if counts is None else out[0]
        parts = []
        for s in range(0, x.shape[1], checkpoint_tokens):
            part = slice(s, s + checkpoint_tokens)
            chunk = None if out_rows is None else out_rows.chunk_counts(s, s + checkpoint_tokens)
            parts.append(
                checkpoint(
                    self._update,
                    x[:, part],
                    None if p is None else p[:, part],
                    ref[:, part],
                    value,
                    spatial_shapes,
                    chunk,
                    use_reentrant=False,
                )
            )
        out = torch.cat(parts, 1)
        return out if counts is None else out[0]

    def _update(
        self,
        x: Tensor,
        pos: Tensor | None,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        counts: list[int] | None = None,
    ) -> Tensor:
        """The output tokens of inputs ``x`` [B, Q, dim] at ``pos``, sampling the projected ``value``; with
        ``counts``, ``x`` [1, T, dim] holds ``counts[b]`` tokens of image b in turn."""
        q = x if pos is None else x + pos
        x = self.norm1(x + self.self_attn.attend(q, reference_points, value, spatial_shapes, counts=counts))
        return self.norm2(x + self.feed_forward(x))
