"""DINO's deformable transformer: encoder, two-stage query selection, decoder with box refinement.

Facts from IDEA-Research/DINO ``models/dino/deformable_transformer.py`` (inference path;
``two_stage_type='standard'``, ``embed_init_tgt=True``, decoder order sa → ca → ffn). Module names
follow the official ones, so released checkpoints load without renaming. The shared machinery
(deformable layers, the refining decoder loop, proposal selection) is in
:mod:`mfdetr.detectors.common`; this module holds only what is DINO-specific.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from mfdetr.detectors.common.decoder import RefiningDecoder
from mfdetr.detectors.common.deformable import DeformableEncoder
from mfdetr.detectors.common.layers import MLP
from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.layers import sine_embed_coords
from mfdetr.detectors.common.proposals import select_proposals

#: DINO embeds query boxes as (y, x, w, h) blocks (``gen_sineembed_for_position``)
DINO_QUERY_SINE_ORDER = (1, 0, 2, 3)
#: DINO's ``inverse_sigmoid`` eps (H-Deformable-DETR uses 1e-5)
DINO_INV_SIGMOID_EPS = 1e-3


class DinoDecoder(RefiningDecoder):
    """Refining decoder whose query positions are recomputed every layer from the reference boxes.

    ``query_pos = ref_point_head(sine(ref · valid_ratios of level 0))`` with ``d/2`` features per
    coordinate in the order y, x, w, h (official: 128 at d = 256, hard-coded there); the heads see
    ``norm(out)`` of every layer, the refinement uses the un-normalised ``out``.

    Args:
        layers: the decoder layers.
        d_model: width ``d``.
    """

    def __init__(self, *, layers: nn.ModuleList, d_model: int) -> None:
        super().__init__(layers=layers, inv_sigmoid_eps=DINO_INV_SIGMOID_EPS)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(input_dim=2 * d_model, hidden_dim=d_model, output_dim=d_model, num_layers=2)
        self.d_model = d_model

    def layer_query_pos(self, ref_input: Tensor, lid: int) -> Tensor:
        sine = sine_embed_coords(ref_input[:, :, 0], num_feats=self.d_model // 2, order=DINO_QUERY_SINE_ORDER)
        return self.ref_point_head(sine)


class DinoTransformer(nn.Module):
    """Encoder + two-stage selection + decoder (keys ``transformer.*`` of the official model).

    Args:
        encoder: deformable encoder; decoder: DINO decoder.
        d_model: width; num_queries: queries kept by the two-stage selection.
        num_levels: encoder levels (``level_embed`` rows); num_classes: head slots.
    """

    def __init__(
        self,
        *,
        encoder: DeformableEncoder,
        decoder: DinoDecoder,
        d_model: int,
        num_queries: int,
        num_levels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.d_model, self.num_queries = d_model, num_queries
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        self.enc_out_bbox_embed = MLP(input_dim=d_model, hidden_dim=d_model, output_dim=4, num_layers=3)
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)

    def select_queries(self, memory: Tensor, levels: FlatLevels) -> tuple[Tensor, Tensor]:
        """Two-stage selection: top-``num_queries`` tokens by **max** class logit of the encoder head.

        Returns ``(tgt [B, Q, d], reference [B, Q, 4])``: learned content queries (``tgt_embed``,
        ``embed_init_tgt``) and the detached sigmoid boxes ``enc_out_bbox_embed(out) + proposal``.
        """
        coords = select_proposals(
            memory,
            levels.mask,
            levels.level_hw(),
            enc_output=self.enc_output,
            enc_output_norm=self.enc_output_norm,
            class_head=self.enc_out_class_embed,
            bbox_head=self.enc_out_bbox_embed,
            k=self.num_queries,
            score="max",
        )
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        return tgt, coords.sigmoid()

    def forward(
        self, levels: FlatLevels, *, keep: Collection[int] = ()
    ) -> tuple[list[Tensor], list[Tensor], Tensor, dict[int, Tensor]]:
        """Returns ``(hs, refs, memory, kept_encoder_outputs)``: ``hs[l]`` = ``decoder.norm`` of layer
        ``l``'s output (the head inputs), ``refs`` as :meth:`RefiningDecoder.forward`."""
        memory, kept = self.encoder(
            levels.src,
            levels.pos,
            levels.level_hw(),
            levels.level_start_index,
            levels.valid_ratios,
            levels.mask,
            keep=keep,
        )
        tgt, reference = self.select_queries(memory, levels)
        outs, refs = self.decoder(tgt, reference, memory, levels)
        return [self.decoder.norm(o) for o in outs], refs, memory, kept


__all__ = ["DINO_INV_SIGMOID_EPS", "DINO_QUERY_SINE_ORDER", "DinoDecoder", "DinoTransformer"]
