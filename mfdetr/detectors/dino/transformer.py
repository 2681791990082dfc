"""DINO's deformable transformer: encoder, two-stage query selection, decoder with box refinement.

Facts from IDEA-Research/DINO ``models/dino/deformable_transformer.py`` (inference path;
``two_stage_type='standard'``, ``embed_init_tgt=True``, decoder order sa → ca → ffn). Module names
follow the official ones, so released checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn

from mfdetr.detectors.common.deformable import DeformableEncoder
from mfdetr.detectors.common.layers import MLP
from mfdetr.detectors.common.multiscale import FlatLevels
from mfdetr.detectors.common.position import sine_embed_coords
from mfdetr.detectors.common.proposals import gen_encoder_output_proposals
from mfdetr.ops import inverse_sigmoid

#: DINO embeds query boxes as (y, x, w, h) blocks (``gen_sineembed_for_position``)
DINO_QUERY_SINE_ORDER = (1, 0, 2, 3)
#: DINO's ``inverse_sigmoid`` eps (H-Deformable-DETR uses 1e-5)
DINO_INV_SIGMOID_EPS = 1e-3


class DinoDecoder(nn.Module):
    """Deformable decoder with per-layer query positions from the reference boxes.

    Every layer: ``query_pos = ref_point_head(sine(ref · valid_ratios))`` (``d/2`` features per
    coordinate, order y, x, w, h); after the layer, ``ref ← sigmoid(bbox_embed[l](out) + logit(ref))``
    from the **un-normalised** output (detached); the heads see ``norm(out)`` of every layer.
    ``bbox_embed`` / ``class_embed`` are the detector's (shared) heads, attached by the detector.

    Args:
        layers: the decoder layers.
        d_model: width ``d``.
    """

    bbox_embed: nn.ModuleList
    class_embed: nn.ModuleList

    def __init__(self, *, layers: nn.ModuleList, d_model: int) -> None:
        super().__init__()
        self.layers = layers
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(input_dim=2 * d_model, hidden_dim=d_model, output_dim=d_model, num_layers=2)
        self.d_model = d_model

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, levels: FlatLevels) -> tuple[list[Tensor], list[Tensor]]:
        """Decode.

        Args:
            tgt: [B, Q, d] content queries.
            reference: [B, Q, 4] initial boxes (sigmoid cxcywh).
            memory: [B, S, d] encoder output.

        Returns:
            ``(hs, refs)``: ``hs[l]`` [B, Q, d] normed outputs of layer ``l``; ``refs[l]`` [B, Q, 4] the
            reference boxes **input** to layer ``l`` (``refs[0]`` = two-stage selection), plus the last
            refined boxes (``len(refs) = len(hs) + 1``).
        """
        ratios = torch.cat([levels.valid_ratios, levels.valid_ratios], -1)  # [B, L, 4]
        out = tgt
        hs, refs = [], [reference]
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios[:, None]  # [B, Q, L, 4]
            sine = sine_embed_coords(ref_input[:, :, 0], num_feats=self.d_model // 2, order=DINO_QUERY_SINE_ORDER)
            query_pos = self.ref_point_head(sine)
            out = layer(out, query_pos, ref_input, memory, levels.spatial_shapes, levels.level_start_index,
                        levels.mask)
            new_ref = (self.bbox_embed[lid](out) + inverse_sigmoid(reference, eps=DINO_INV_SIGMOID_EPS)).sigmoid()
            reference = new_ref.detach()
            refs.append(new_ref)
            hs.append(self.norm(out))
        return hs, refs


class DinoTransformer(nn.Module):
    """Encoder + two-stage selection + decoder (keys ``transformer.*`` of the official model).

    Args:
        encoder: deformable encoder; decoder: DINO decoder.
        d_model: width; num_queries: queries kept by the two-stage selection.
        num_levels: encoder levels (``level_embed`` rows); num_classes: head slots.
    """

    def __init__(self, *, encoder: DeformableEncoder, decoder: DinoDecoder, d_model: int, num_queries: int,
                 num_levels: int, num_classes: int) -> None:
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
        """Two-stage selection: top-``num_queries`` tokens by max class logit of the encoder head.

        Returns ``(tgt [B, Q, d], reference [B, Q, 4])``: learned content queries (``tgt_embed``) and
        the detached sigmoid boxes ``enc_out_bbox_embed(out) + proposal`` of the selected tokens.
        """
        out, proposals = gen_encoder_output_proposals(memory, levels.mask, levels.spatial_shapes)
        out = self.enc_output_norm(self.enc_output(out))
        scores = self.enc_out_class_embed(out).max(-1).values
        k = min(self.num_queries, scores.shape[1])
        if k < self.num_queries:
            raise ValueError(f"{scores.shape[1]} encoder tokens < {self.num_queries} queries: image too small")
        idx = torch.topk(scores, k, dim=1)[1]
        coords = self.enc_out_bbox_embed(out) + proposals
        reference = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4)).detach().sigmoid()
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        return tgt, reference

    def forward(self, levels: FlatLevels, *, keep: Collection[int] = ()) -> tuple[list[Tensor], list[Tensor], Tensor, dict[int, Tensor]]:
        """Returns ``(hs, refs, memory, kept_encoder_outputs)`` (see :meth:`DinoDecoder.forward`)."""
        memory, kept = self.encoder(levels.src, levels.pos, levels.spatial_shapes, levels.level_start_index,
                                    levels.valid_ratios, levels.mask, keep=keep)
        tgt, reference = self.select_queries(memory, levels)
        hs, refs = self.decoder(tgt, reference, memory, levels)
        return hs, refs, memory, kept


__all__ = ["DINO_INV_SIGMOID_EPS", "DINO_QUERY_SINE_ORDER", "DinoDecoder", "DinoTransformer"]
