"""H-Deformable-DETR's transformer glue: two-stage *mixed* query selection over the shared encoder
and refining decoder.

Facts from HDETR/H-Deformable-DETR ``models/deformable_transformer.py`` (inference path):

- proposals are scored by the **class-0** logit of the extra (last) heads ``class_embed[dec_layers]``
  / ``bbox_embed[dec_layers]`` (DINO: max over classes of its own encoder heads);
- the query positional embedding is computed **once** from the selected boxes:
  ``pos_trans_norm(pos_trans(sine(sigmoid(boxes))))[..., :d]`` with the sine blocks in (x, y, w, h)
  order, temperature 10000, ``d/2`` features per coordinate (official 128 at d = 256);
- the content queries are the first ``num_queries_one2one`` rows of the detector's ``query_embed``
  (mixed selection); the decoder has no final norm, so the heads see raw layer outputs.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from mfdetr.detectors.common.decoder import RefiningDecoder
from mfdetr.detectors.common.deformable import DeformableEncoder
from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.layers import sine_embed_coords
from mfdetr.detectors.common.proposals import select_proposals

#: H-DETR's ``inverse_sigmoid`` eps (``util/misc.py``; DINO uses 1e-3)
HDETR_INV_SIGMOID_EPS = 1e-5
#: ``get_proposal_pos_embed`` embeds the selected boxes as (x, y, w, h) blocks
HDETR_QUERY_SINE_ORDER = (0, 1, 2, 3)


class HDetrTransformer(nn.Module):
    """Encoder + mixed two-stage selection + decoder (keys ``transformer.*`` of the official model).

    Args:
        encoder: the shared deformable encoder (post-norm layers, no final norm).
        decoder: the shared refining decoder (its ``class_embed`` / ``bbox_embed`` — ``dec_layers + 1``
            heads — are attached by the detector).
        d_model: width ``d``; num_queries: proposals kept (= ``num_queries_one2one``).
        num_levels: encoder levels (``level_embed`` rows).
    """

    def __init__(
        self, *, encoder: DeformableEncoder, decoder: RefiningDecoder, d_model: int, num_queries: int, num_levels: int
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.d_model, self.num_queries = d_model, num_queries
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        nn.init.normal_(self.level_embed)

    def query_pos(self, reference: Tensor) -> Tensor:
        """[B, Q, 4] sigmoid boxes → [B, Q, d]: the first ``d`` channels of the normed projection of
        their sine embedding (the other ``d`` are unused with mixed selection)."""
        sine = sine_embed_coords(reference, num_feats=self.d_model // 2, order=HDETR_QUERY_SINE_ORDER)
        return self.pos_trans_norm(self.pos_trans(sine))[..., : self.d_model]

    def forward(
        self, levels: FlatLevels, *, keep: Collection[int] = (), content: Tensor
    ) -> tuple[list[Tensor], list[Tensor], Tensor, dict[int, Tensor]]:
        """Run encoder, selection and decoder.

        Args:
            levels: flattened multi-scale tokens.
            keep: 1-based encoder layers whose outputs to return.
            content: [Q, d] content queries (``query_embed.weight[:num_queries]``).

        Returns:
            ``(hs, refs, memory, kept)``: raw decoder outputs per layer [B, Q, d], reference boxes
            (input of every layer, then the last refined ones), last encoder output [B, S, d], and
            ``{layer: [B, S, d]}``.
        """
        memory, kept = self.encoder(
            levels.src,
            levels.pos,
            levels.level_hw(),
            levels.level_start_index,
            levels.valid_ratios,
            levels.mask,
            keep=keep,
        )
        last = self.decoder.num_layers  # the extra heads score the encoder proposals
        boxes = select_proposals(
            memory,
            levels.mask,
            levels.level_hw(),
            enc_output=self.enc_output,
            enc_output_norm=self.enc_output_norm,
            class_head=self.decoder.class_embed[last],
            bbox_head=self.decoder.bbox_embed[last],
            k=self.num_queries,
            score="first",
        )
        reference = boxes.sigmoid()
        tgt = content[None].expand(memory.shape[0], -1, -1)
        hs, refs = self.decoder(tgt, reference, memory, levels, query_pos=self.query_pos(reference))
        return hs, refs, memory, kept


__all__ = ["HDETR_INV_SIGMOID_EPS", "HDETR_QUERY_SINE_ORDER", "HDetrTransformer"]
