"""A differentiable DINO forward for training, built from the frozen detector's own submodules.

The detector's :meth:`~mfdetr.detectors.dino.model.DinoDetector.forward_detr` is inference-oriented:
its two-stage selection returns detached reference boxes only. Training also needs the **encoder
proposal** outputs of the selected tokens (DINO's ``interm_outputs``: class logits of
``enc_out_class_embed`` and the undetached sigmoid boxes ``enc_out_bbox_embed(out) + proposal``), so
this module re-runs the same submodules in the same order (IDEA-Research/DINO
``deformable_transformer.py`` two-stage ``standard``; ``dino.py`` heads) and returns them too. The final
layer's outputs equal ``forward_detr``'s (checked by the tests).

:func:`init_for_training` applies DINO's training initialisation where the frozen builder does not:
the encoder proposal heads are copies of the decoder heads' init (class bias at the focal prior,
zero last box layer), as in the official ``enc_out_class_embed = copy.deepcopy(_class_embed)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mfdetr.detectors.common.multiscale import flatten_levels, project_levels
from mfdetr.detectors.common.proposals import gen_encoder_output_proposals
from mfdetr.detectors.dino.model import DinoDetector
from mfdetr.detectors.dino.transformer import DINO_INV_SIGMOID_EPS
from mfdetr.detectors.training.denoising import DenoisingQueries
from mfdetr.ops import inverse_sigmoid

#: focal-loss prior probability of the class-logit bias (RetinaNet / Deformable DETR / DINO)
FOCAL_PRIOR = 0.01


@dataclass
class TrainForward:
    """Outputs for the set criterion (Q queries, C classes, normalised cxcywh boxes).

    - ``layer_logits[l]`` [B, Q, C], ``layer_boxes[l]`` [B, Q, 4] — every decoder layer (last = final);
    - ``enc_logits`` [B, Q, C], ``enc_boxes`` [B, Q, 4] — the selected two-stage encoder proposals;
    - ``dn_logits`` / ``dn_boxes`` — the denoising slots of every layer (``dn``: their layout), or ``None``.
    """

    layer_logits: list[Tensor]
    layer_boxes: list[Tensor]
    enc_logits: Tensor
    enc_boxes: Tensor
    #: every decoder layer's outputs of the denoising slots (``[B, P, C]`` / ``[B, P, 4]``), when used
    dn_logits: list[Tensor] | None = None
    dn_boxes: list[Tensor] | None = None
    dn: DenoisingQueries | None = None

    @property
    def logits(self) -> Tensor:
        return self.layer_logits[-1]

    @property
    def boxes(self) -> Tensor:
        return self.layer_boxes[-1]


def focal_prior_bias(prior: float = FOCAL_PRIOR) -> float:
    """Class-logit bias with ``sigmoid(bias) = prior``: ``-log((1 - p) / p)``."""
    return -math.log((1 - prior) / prior)


def init_for_training(model: DinoDetector, *, prior: float = FOCAL_PRIOR) -> DinoDetector:
    """DINO's training init of the heads (in place): class biases at the focal prior for the decoder
    heads **and** the encoder proposal head; zero last layer of the encoder proposal box head."""
    tr = model.transformer
    bias = focal_prior_bias(prior)
    with torch.no_grad():
        for head in list(model.class_embed) + [tr.enc_out_class_embed]:
            head.bias.fill_(bias)
        last = tr.enc_out_bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
    return model


def dino_train_forward(
    model: DinoDetector, images: Tensor, pad_mask: Tensor, dn: DenoisingQueries | None = None
) -> TrainForward:
    """Differentiable DINO forward, optionally with contrastive denoising slots in front of the queries.

    Args:
        model: a DINO detector in ``train()`` mode with gradients enabled.
        images: [B, 3, H, W] normalised, zero-padded; pad_mask: [B, H, W] True at padding.
        dn: denoising queries (:func:`~mfdetr.detectors.training.denoising.prepare_cdn`), or ``None``.
    """
    feats = model.body(images)
    srcs, masks, _ = project_levels(model.input_proj, [feats[i] for i in model.body.out_indices], pad_mask)
    poss = [model.position(m).to(s.dtype) for s, m in zip(srcs, masks, strict=True)]
    tr = model.transformer
    levels = flatten_levels(srcs, masks, poss, tr.level_embed)
    memory, _ = tr.encoder(
        levels.src, levels.pos, levels.spatial_shapes, levels.level_start_index, levels.valid_ratios, levels.mask
    )
    # two-stage selection (same as DinoTransformer.select_queries, keeping the undetached outputs)
    out, proposals = gen_encoder_output_proposals(memory, levels.mask, levels.spatial_shapes)
    out = tr.enc_output_norm(tr.enc_output(out))
    enc_class = tr.enc_out_class_embed(out)
    k = tr.num_queries
    if k > enc_class.shape[1]:
        raise ValueError(f"{enc_class.shape[1]} encoder tokens < {k} queries: image too small")
    idx = torch.topk(enc_class.max(-1).values, k, dim=1)[1]
    coords = tr.enc_out_bbox_embed(out) + proposals
    coords_sel = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4))  # [B, Q, 4] logits, undetached
    enc_logits = torch.gather(enc_class, 1, idx[..., None].expand(-1, -1, enc_class.shape[-1]))
    reference = coords_sel.detach().sigmoid()
    tgt = tr.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
    mask, pad = None, 0
    if dn is not None:
        tgt, reference, mask, pad = (
            torch.cat([dn.tgt, tgt], 1),
            torch.cat([dn.reference, reference], 1),
            dn.attn_mask,
            dn.pad_size,
        )
    outs, refs = tr.decoder(tgt, reference, memory, levels, self_attn_mask=mask)
    hs = [tr.decoder.norm(o) for o in outs]  # the heads see the normed outputs (as at inference)
    layer_boxes = [
        (model.bbox_embed[lid](h) + inverse_sigmoid(refs[lid], eps=DINO_INV_SIGMOID_EPS)).sigmoid()
        for lid, h in enumerate(hs)
    ]
    layer_logits = [model.class_embed[lid](h) for lid, h in enumerate(hs)]
    out = TrainForward(
        layer_logits=[x[:, pad:] for x in layer_logits],
        layer_boxes=[x[:, pad:] for x in layer_boxes],
        enc_logits=enc_logits,
        enc_boxes=coords_sel.sigmoid(),
    )
    if dn is not None:
        out.dn_logits, out.dn_boxes, out.dn = [x[:, :pad] for x in layer_logits], [x[:, :pad] for x in layer_boxes], dn
    return out


def trainable_model(model: nn.Module) -> nn.Module:
    """Undo :meth:`FrozenDetr.freeze` for training: ``train()`` and gradients on every parameter."""
    model.train()
    model.requires_grad_(True)
    return model


__all__ = [
    "FOCAL_PRIOR",
    "TrainForward",
    "dino_train_forward",
    "focal_prior_bias",
    "init_for_training",
    "trainable_model",
]
