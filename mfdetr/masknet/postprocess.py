"""Post-processing: paste the predicted masks into the original image, score them, write COCO results.

Eq. 4: each S×S mask (sigmoid of the logits) is resized to its box's size in the original image with
bilinear interpolation and pasted into an empty image; the binary mask is ``prob > 0.5``. The
detector's box is mapped back to the original image by scaling the normalised box with ``orig_hw``
(the evaluation resize is uniform). Pasting samples each original pixel centre inside the box with
``grid_sample`` (align_corners=False) — the inverse of the RoIAlign(aligned=True) crop used for the
targets — so a crop followed by a paste reproduces the mask. Pixels whose centre lies in the box read
the nearest cells (border padding), pixels outside it are background, so a box-filling mask pastes to
exactly the box's pixels. The non-RoI baseline's masks live on the
padded stride-4 input grid; their valid cells (``ceil(input_hw / 4)``) are cropped and pasted the
same way with the box those cells cover in original pixels (i.e. resized to the original image).

Scores (``score``):

- ``"mask_prob"`` — eq. 2: ``c_i × mean(M_i[M_i > 0.5])`` at original resolution (0 for empty masks);
- ``"mask_iou"`` — eq. 13: ``c_i × iou_i`` with the mask-scoring head's predicted IoU (clamped to [0, 1]);
- ``"box"`` — ``c_i`` alone.

``c_i`` is the detector's class score (max sigmoid over class slots); the category is the arg-max
slot mapped through the preset's ``class_to_category`` (slots mapping to 0 are not COCO categories and
are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torch import Tensor

from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError
from mfdetr.masknet.targets import first_queries, is_input_grid_output, pred_boxes_original
from mfdetr.ops.boxes import coco_bbox

__all__ = ["ScoreMode", "encode_rle", "masks_to_coco_results", "paste_masks"]

ScoreMode = Literal["mask_prob", "mask_iou", "box"]


class _MaskOutput(Protocol):
    mask_logits: Tensor
    iou_pred: Tensor | None


def paste_masks(
    probs: Tensor, boxes: Tensor, image_hw: tuple[int, int], *, threshold: float = 0.5, max_elems: int = 1 << 24
) -> tuple[Tensor, Tensor]:
    """Paste box-relative probability maps into an image and binarise them (eq. 4).

    Args:
        probs: [K, Sh, Sw] probabilities on each box's grid.
        boxes: [K, 4] xyxy boxes in image pixels (pixel ``j`` covers [j, j+1)); may extend beyond the image.
        image_hw: (H, W) of the image.
        threshold: foreground where the pasted probability is ``> threshold``.
        max_elems: memory budget (pixels sampled at once); on CPU masks are pasted one by one, each
            only inside its box, on accelerators in chunks over the chunk's joint box region.

    Returns:
        ``masks`` [K, H, W] bool (a transposed view of a [K, W, H] buffer) and ``mean_prob`` [K] float,
        the mean probability over each mask's foreground pixels (eq. 2's ratio; 0 for an empty mask).
    """
    h, w = image_hw
    k = int(probs.shape[0])
    dev = probs.device
    # stored as [K, W, H] and returned as a [K, H, W] view: RLE encoding (column-major) then needs no
    # transpose of the whole masks, only the pasted box regions are written transposed
    buf = torch.zeros((k, w, h), dtype=torch.bool, device=dev)
    masks = buf.transpose(1, 2)
    mean_prob = torch.zeros(k, dtype=torch.float32, device=dev)
    if k == 0 or h == 0 or w == 0:
        return masks, mean_prob
    boxes = boxes.to(device=dev, dtype=torch.float32)
    p = probs.float()[:, None]
    # Pixel range each box touches (one pixel margin for the bilinear fringe), clamped to the image.
    x0 = (boxes[:, 0].floor() - 1).clamp(0, w).long().tolist()
    y0 = (boxes[:, 1].floor() - 1).clamp(0, h).long().tolist()
    x1 = (boxes[:, 2].ceil() + 1).clamp(0, w).long().tolist()
    y1 = (boxes[:, 3].ceil() + 1).clamp(0, h).long().tolist()
    chunk = 1 if dev.type == "cpu" else max(1, min(k, max_elems // (h * w)))
    for s in range(0, k, chunk):
        e = min(k, s + chunk)
        rx0, ry0 = min(x0[s:e]), min(y0[s:e])
        rx1, ry1 = max(x1[s:e]), max(y1[s:e])
        if rx1 <= rx0 or ry1 <= ry0:
            continue
        b = boxes[s:e]
        bw = (b[:, 2] - b[:, 0]).clamp(min=1e-6)
        bh = (b[:, 3] - b[:, 1]).clamp(min=1e-6)
        xs = torch.arange(rx0, rx1, device=dev, dtype=torch.float32) + 0.5
        ys = torch.arange(ry0, ry1, device=dev, dtype=torch.float32) + 0.5
        gx = (xs[None, :] - b[:, 0:1]) / bw[:, None] * 2 - 1  # [c, RW]
        gy = (ys[None, :] - b[:, 1:2]) / bh[:, None] * 2 - 1  # [c, RH]
        c, rh, rw = e - s, ry1 - ry0, rx1 - rx0
        grid = torch.stack([gx[:, None, :].expand(c, rh, rw), gy[:, :, None].expand(c, rh, rw)], dim=-1)
        # Inside the box, the outer half-cell reads the edge cell (border padding); outside the box the
        # mask is 0. (Zero padding would blur the box edge and drop the corners of a box-filling mask.)
        pasted = F.grid_sample(p[s:e], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
        inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
        pasted = pasted * inside
        fg = pasted > threshold
        buf[s:e, rx0:rx1, ry0:ry1] = fg.transpose(1, 2)
        cnt = fg.flatten(1).sum(1)
        tot = (pasted * fg).flatten(1).sum(1)
        mean_prob[s:e] = torch.where(cnt > 0, tot / cnt.clamp(min=1), torch.zeros_like(tot))
    return masks, mean_prob


def encode_rle(masks: Tensor) -> list[dict[str, Any]]:
    """[K, H, W] bool masks → COCO RLEs (``counts`` as str, JSON-ready)."""
    if masks.shape[0] == 0:
        return []
    # [K, W, H] C-contiguous (built on the masks' device; free for masks from paste_masks) is
    # [H, W, K] Fortran-contiguous, the layout pycocotools encodes: no copy on the host
    kwh = (
        masks.transpose(1, 2).contiguous().view(torch.uint8)
        if masks.dtype == torch.bool
        else (masks.transpose(1, 2).to(torch.uint8).contiguous())
    )
    arr = kwh.cpu().numpy().transpose(2, 1, 0)
    rles = mask_util.encode(arr)
    out = []
    for r in rles:
        out.append({"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")})
    return out


@torch.no_grad()
def masks_to_coco_results(
    out: _MaskOutput,
    det: DetectorOutput,
    class_to_category: Sequence[int],
    image_ids: Sequence[int],
    *,
    score: ScoreMode = "mask_iou",
    on_input_grid: bool | None = None,
    mask_threshold: float = 0.5,
    min_score: float = 0.0,
    grid_stride: int = 4,
) -> list[dict[str, Any]]:
    """COCO instance-segmentation results of a batch, ready for a results JSON / ``COCO.loadRes``.

    Args:
        out: the mask network's output: ``mask_logits`` [B, K', Sh, Sw] for the first K' ≤ K queries (on
            each box's RoI grid, or on the padded stride-4 input grid when ``on_input_grid``) and
            ``iou_pred`` [B, K'] or ``None``.
        det: the detector outputs the masks were predicted from (boxes, logits, sizes).
        class_to_category: class slot → COCO category id (0 = unused slot).
        image_ids: B COCO image ids.
        score: ``"mask_prob"`` (eq. 2), ``"mask_iou"`` (eq. 13, needs ``iou_pred``) or ``"box"``.
        on_input_grid: masks are on the stride-``grid_stride`` input grid (non-RoI baseline);
            ``None`` reads the output's flag.
        mask_threshold: binarisation threshold of the pasted probabilities (0.5).
        min_score: results with a lower final score are dropped.

    Returns:
        One dict per kept prediction: ``image_id``, ``category_id``, ``score``, ``bbox`` (xywh in
        original pixels, from the detector's box) and ``segmentation`` (RLE, ``counts`` str).
    """
    logits = out.mask_logits
    if on_input_grid is None:
        on_input_grid = is_input_grid_output(out)
    bsz = int(logits.shape[0])
    det = _checked_queries(out, det, class_to_category, image_ids, score)
    cls_prob, slot = det.logits.float().sigmoid().max(dim=-1)  # c_i and arg-max slot, [B, K]
    cat_table = torch.as_tensor(list(class_to_category), dtype=torch.long, device=slot.device)
    cats = cat_table[slot]
    boxes = pred_boxes_original(det)
    results: list[dict[str, Any]] = []
    for b in range(bsz):
        h0, w0 = (int(v) for v in det.orig_hw[b].tolist())
        keep = torch.nonzero(cats[b] > 0).flatten()
        if keep.numel() == 0:
            continue
        probs = logits[b, keep.to(logits.device)].float().sigmoid()
        if on_input_grid:
            probs, paste_boxes = _on_whole_image(probs, det, b, grid_stride, boxes.device)
            paste_boxes = paste_boxes[None].expand(keep.numel(), 4)
        else:
            paste_boxes = boxes[b, keep]
        masks, mean_prob = paste_masks(probs, paste_boxes, (h0, w0), threshold=mask_threshold)
        s = _final_score(score, cls_prob[b, keep], mean_prob, out.iou_pred, b, keep)
        xywh = coco_bbox(boxes[b, keep], (h0, w0)).cpu().tolist()
        rles = encode_rle(masks)
        s_list, c_list = s.cpu().tolist(), cats[b, keep].cpu().tolist()
        for i in range(keep.numel()):
            if s_list[i] < min_score:
                continue
            results.append(
                {
                    "image_id": int(image_ids[b]),
                    "category_id": int(c_list[i]),
                    "score": float(s_list[i]),
                    "bbox": [float(v) for v in xywh[i]],
                    "segmentation": rles[i],
                }
            )
    return results


def _checked_queries(
    out: _MaskOutput, det: DetectorOutput, class_to_category: Sequence[int], image_ids: Sequence[int], score: ScoreMode
) -> DetectorOutput:
    """``det`` cut to the queries the network segmented (its top K'), once the shapes, ids, score mode and
    category table are checked against each other."""
    logits = out.mask_logits
    bsz, k = int(logits.shape[0]), int(logits.shape[1])
    if bsz != det.batch_size or k > det.num_queries:
        raise ValueError(f"mask_logits {tuple(logits.shape)} do not match B={det.batch_size}, K ≤ {det.num_queries}")
    det = first_queries(det, k)  # the network may segment only the top K' queries
    if len(image_ids) != bsz:
        raise ValueError(f"got {len(image_ids)} image ids for a batch of {bsz}")
    if score == "mask_iou" and out.iou_pred is None:
        raise MfdetrError("score 'mask_iou' (eq. 13) needs a mask-scoring head; use 'mask_prob' (eq. 2)")
    if len(class_to_category) != det.logits.shape[-1]:
        raise ValueError(
            f"class_to_category has {len(class_to_category)} entries for {det.logits.shape[-1]} class slots"
        )
    return det


def _on_whole_image(
    probs: Tensor, det: DetectorOutput, b: int, grid_stride: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Masks on the padded stride-``grid_stride`` input grid: their valid cells, and the box (original
    pixels) that pastes them over the whole image."""
    h0, w0 = (int(v) for v in det.orig_hw[b].tolist())
    hi, wi = (int(v) for v in det.input_hw[b].tolist())
    hv, wv = -(-hi // grid_stride), -(-wi // grid_stride)
    box = torch.tensor([0.0, 0.0, grid_stride * wv * w0 / wi, grid_stride * hv * h0 / hi], device=device)
    return probs[:, :hv, :wv], box


def _final_score(
    score: ScoreMode, c: Tensor, mean_prob: Tensor, iou_pred: Tensor | None, b: int, keep: Tensor
) -> Tensor:
    """The final score of image ``b``'s kept predictions from their class probability ``c``: times the mean
    mask probability (eq. 2), times the predicted mask IoU (eq. 13), or alone (``"box"``)."""
    if score == "mask_prob":
        return c * mean_prob.to(c.device)
    if score == "mask_iou":
        assert iou_pred is not None
        return c * iou_pred[b, keep.to(iou_pred.device)].float().clamp(0, 1).to(c.device)
    return c
