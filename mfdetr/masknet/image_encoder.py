"""Image feature encoder F_e (sec. 3.2, eq. 5-8, Table 2) on the cached encoder maps E = [E_1..E_L].

The blocks are a registered kind (:mod:`mfdetr.masknet.blocks`): ``deformable`` (eq. 6) runs over ALL
levels; ``swin`` (eq. 7) / ``convnext`` (eq. 8) refine the highest-resolution level E_1 only and the
other levels pass through unchanged.

Only E_1 is consumed downstream (F = C1 + up(E_1)): :meth:`ImageEncoder.first_level` computes just that
(the last deformable layer then updates only E_1's tokens, still attending to every level; in training,
only the tokens under the boxes that get a loss);
:meth:`ImageEncoder.forward` returns every level.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mfdetr.masknet.blocks import BlockArgs, get_block


class ImageEncoder(nn.Module):
    """F_e: refines the encoder maps for all queries at once (eq. 5).

    Args:
        block: a registered block kind (:func:`mfdetr.masknet.blocks.block_names`).
        layers: the stacked blocks (already built; may be empty).
        level_embed: the kind's learned embedding ([L, d] level embedding of ``deformable``) or ``None``.
        checkpoint_tokens: activation checkpointing chunk (0 = off; see ``MaskNetConfig``).
    """

    def __init__(
        self,
        *,
        block: str,
        layers: list[nn.Module],
        level_embed: nn.Parameter | None = None,
        checkpoint_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.checkpoint_tokens = checkpoint_tokens
        self.block = block
        self.kind = get_block(block)
        self.layers = nn.ModuleList(layers)
        self.level_embed = level_embed

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self, maps: list[Tensor], valid_hw: Tensor, *, first_level_only: bool = False, needed: Tensor | None = None
    ) -> list[Tensor]:
        """``maps`` per level [B, d, H_l, W_l] zero outside ``valid_hw`` [B, L, 2] → same shapes, zero outside
        (only E_1 with ``first_level_only``: see :meth:`first_level`)."""
        if not self.layers:
            return maps[:1] if first_level_only else maps
        return self.kind.encode_maps(
            self.layers, maps, valid_hw, self.level_embed, first_level_only=first_level_only, **self._options(needed)
        )

    def first_level(self, maps: list[Tensor], valid_hw: Tensor, needed: Tensor | None = None) -> Tensor:
        """E_1 alone: ``forward(maps, valid_hw)[0]``, without updating the other levels' tokens in
        the last deformable layer (their outputs would not be used). With ``needed`` [B, H_1, W_1] bool,
        only those tokens are exact (the last deformable layer updates only them; the rest are zero)."""
        return self(maps, valid_hw, first_level_only=True, needed=needed)[0]

    def _options(self, needed: Tensor | None = None) -> dict[str, Any]:
        """The optional keywords of ``encode_maps`` that are set (a kind may predate them)."""
        kw: dict[str, Any] = {} if needed is None else {"needed": needed}
        if self.checkpoint_tokens:
            kw["checkpoint_tokens"] = self.checkpoint_tokens
        return kw


def build_image_encoder(
    *,
    block: str,
    layers: int,
    dim: int,
    levels: int,
    heads: int = 8,
    points: int = 4,
    ffn_ratio: float = 4.0,
    swin_window: int = 16,
    convnext_kernel: int = 7,
    level_embed: bool = True,
    checkpoint_tokens: int = 0,
) -> ImageEncoder:
    """Build F_e with every number visible (Table 2: ``block`` × ``layers`` at width ``dim``)."""
    args = BlockArgs(
        dim=dim,
        heads=heads,
        points=points,
        ffn_hidden=int(round(ffn_ratio * dim)),
        window=swin_window,
        kernel=convnext_kernel,
        level_embed=level_embed,
    )
    mods, emb = get_block(block).build_image(layers, args, levels=levels)
    return ImageEncoder(block=block, layers=mods, level_embed=emb, checkpoint_tokens=checkpoint_tokens)
