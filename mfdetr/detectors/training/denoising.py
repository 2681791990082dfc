"""Contrastive denoising (CDN) queries for DINO training (IDEA-Research/DINO ``dn_components.py``).

Per batch, the GT boxes and labels are repeated in ``G`` groups; each group holds a **positive** copy
of every GT (box corners moved by less than ``box_noise_scale`` × half its size) and a **negative**
one (moved by 1–2 × that), labels flipped to a random class with probability
``label_noise_ratio / 2``. The copies enter the decoder in front of the matching queries: content
``label_enc(label)``, reference box the noised box. Layout of the ``P = 2 · G · S`` denoising slots
(``S`` = most GT in one image of the batch): block ``i`` (``i = 0 .. 2G−1``) is slots
``[i·S, (i+1)·S)``, positive when ``i`` is even; image ``b``'s GT ``j`` sits at offset ``j`` of every
block, the remaining slots are padding (zero content, reference box sigmoid(0) = 0.5 everywhere).

The self-attention mask keeps the task honest: matching queries cannot see any denoising slot, and a
group cannot see another group. The loss (:meth:`SetCriterion.dn_losses`) needs no matching: the
positive slot of GT ``j`` must reconstruct GT ``j`` (focal class loss over all slots, negatives and
padding as background; L1 + GIoU on positives; normalised by ``num_boxes · G``).

Groups: ``G = max(1, dn_number // S)`` (the official formula for ``dn_number ≥ 50``). Randomness comes
from an explicit generator, so the training loop can make every step's noise a function of
``(seed, step)`` (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mfdetr.ops import box_cxcywh_to_xyxy, inverse_sigmoid


@dataclass
class DenoisingQueries:
    """Denoising slots of one batch (see the module doc).

    - ``tgt`` [B, P, d] content; ``reference`` [B, P, 4] sigmoid cxcywh boxes;
    - ``attn_mask`` [P + Q, P + Q] bool (True = blocked) for ``Q`` matching queries behind them;
    - ``groups`` ``G``; ``single_pad`` ``S``; ``num_gt[b]`` GT of image ``b``.
    """

    tgt: Tensor
    reference: Tensor
    attn_mask: Tensor
    groups: int
    single_pad: int
    num_gt: list[int]

    @property
    def pad_size(self) -> int:
        return 2 * self.groups * self.single_pad

    def positive_pairs(self, b: int) -> tuple[Tensor, Tensor]:
        """``(slots, gt_indices)`` of image ``b``'s positive copies (every group)."""
        n = self.num_gt[b]
        j = torch.arange(n, dtype=torch.long)
        starts = torch.arange(self.groups, dtype=torch.long) * 2 * self.single_pad
        return (starts[:, None] + j[None]).flatten(), j.repeat(self.groups)


def cdn_attn_mask(groups: int, single_pad: int, num_queries: int, device: torch.device | str = "cpu") -> Tensor:
    """[P + Q, P + Q] bool: matching queries do not see denoising slots; groups do not see each other."""
    pad = 2 * groups * single_pad
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    for g in range(groups):
        lo, hi = 2 * single_pad * g, 2 * single_pad * (g + 1)
        mask[lo:hi, :lo] = True
        mask[lo:hi, hi:pad] = True
    return mask


def prepare_cdn(
    targets: list[dict[str, Tensor]],
    *,
    label_enc: nn.Embedding,
    num_classes: int,
    num_queries: int,
    dn_number: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 0.4,
    generator: torch.Generator | None = None,
    inv_sigmoid_eps: float = 1e-3,
) -> DenoisingQueries | None:
    """Denoising queries for a batch, or ``None`` when it holds no GT box (or ``dn_number`` is 0).

    Args:
        targets: per image ``{"labels": [N] head slots, "boxes": [N, 4] normalised cxcywh}``.
        label_enc: the detector's ``label_enc`` (rows = class slots + 1).
        num_classes: classes a noised label is drawn from (at most ``dn_labelbook_size``);
            num_queries: matching queries behind.
        dn_number, label_noise_ratio, box_noise_scale: DINO's ``dn_number`` (100),
            ``dn_label_noise_ratio`` (0.5), ``dn_box_noise_scale`` (0.4 in the 4-scale config).
        generator: CPU generator for the noise (default: torch's global one).
    """
    num_gt = [int(t["labels"].numel()) for t in targets]
    single_pad = max(num_gt, default=0)
    if dn_number <= 0 or single_pad == 0:
        return None
    device = label_enc.weight.device
    groups = max(1, dn_number // single_pad)
    labels = torch.cat([t["labels"] for t in targets]).cpu()
    book = label_enc.num_embeddings - 1  # label_enc has dn_labelbook_size + 1 rows
    if int(labels.max()) >= label_enc.num_embeddings:
        raise ValueError(
            f"class slot {int(labels.max())} has no row in label_enc ({label_enc.num_embeddings} rows): "
            "the preset's dn_labelbook_size is smaller than its class count"
        )
    num_classes = max(1, min(num_classes, book))
    boxes = torch.cat([t["boxes"] for t in targets]).float().cpu()
    n = labels.numel()
    reps = 2 * groups
    lab = labels.repeat(reps)
    box = boxes.repeat(reps, 1)
    if label_noise_ratio > 0:
        flip = torch.rand(lab.shape, generator=generator) < label_noise_ratio * 0.5
        lab = torch.where(flip, torch.randint(0, num_classes, lab.shape, generator=generator), lab)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(box)
        half = torch.cat([box[:, 2:] / 2, box[:, 2:] / 2], 1)
        sign = torch.randint(0, 2, box.shape, generator=generator).float() * 2 - 1
        part = torch.rand(box.shape, generator=generator)
        negative = (torch.arange(reps * n) // n) % 2 == 1
        part[negative] += 1.0
        xyxy = (xyxy + part * sign * half * box_noise_scale).clamp(0.0, 1.0)
        box = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    bsz, pad = len(targets), 2 * groups * single_pad
    tgt = torch.zeros(bsz, pad, label_enc.weight.shape[1], device=device, dtype=label_enc.weight.dtype)
    ref_unsig = torch.zeros(bsz, pad, 4, device=device)
    image = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(num_gt)]).repeat(reps)
    within = torch.cat([torch.arange(k) for k in num_gt])
    slot = torch.cat([within + single_pad * i for i in range(reps)])
    tgt[image.to(device), slot.to(device)] = label_enc(lab.to(device))
    ref_unsig[image.to(device), slot.to(device)] = inverse_sigmoid(box.to(device), eps=inv_sigmoid_eps)
    return DenoisingQueries(
        tgt=tgt,
        reference=ref_unsig.sigmoid(),
        attn_mask=cdn_attn_mask(groups, single_pad, num_queries, device),
        groups=groups,
        single_pad=single_pad,
        num_gt=num_gt,
    )


__all__ = ["DenoisingQueries", "cdn_attn_mask", "prepare_cdn"]
