"""Learning test: the real MaskNet + MaskCriterion overfit one synthetic image.

A 64×64 image holds three shapes (ellipse, triangle partly occluding it, ring) with their *visible*
masks. The frozen detector is simulated: C1 and the encoder maps (strides 4/8/16/32) are fixed random
linear projections of the image's pixel patches, so the features carry the shapes; the boxes are the
GT boxes (plus a jittered duplicate, which box-IoU assignment also supervises); the queries are random
but fixed. A tiny MaskNet with the paper's default component set (deformable image encoder, neck,
channel mapper + deformable box encoder, FFN + box-to-object query encoder, dot-product head, mask
scoring) is trained with AdamW on the default point-sampled loss; the pasted masks (post-processing at
original resolution) must reach IoU > 0.9 with every GT mask.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.masknet import MaskNetConfig, MaskNetOutput, build_masknet
from mfdetr.masknet.config import (
    BoxEncoderConfig,
    ImageEncoderConfig,
    MaskScoringConfig,
    NeckConfig,
    QueryEncoderConfig,
)
from mfdetr.masknet.criterion import MaskCriterion
from mfdetr.masknet.losses import LossConfig
from mfdetr.masknet.postprocess import masks_to_coco_results, paste_masks
from mfdetr.masknet.targets import pred_boxes_original

H = W = 64
D = 32
STRIDES = (8, 16, 32)


def synthetic_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image [3, H, W] in [0, 1] and visible masks [3, H, W] bool (ellipse, triangle, ring)."""
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    ellipse = ((xx - 20) / 14) ** 2 + ((yy - 20) / 9) ** 2 <= 1

    # triangle with vertices (26, 14), (46, 40), (18, 40): inside all three half-planes
    def side(ax: float, ay: float, bx: float, by: float) -> torch.Tensor:
        return (bx - ax) * (yy - ay) - (by - ay) * (xx - ax)

    s1, s2, s3 = side(26, 14, 46, 40), side(46, 40, 18, 40), side(18, 40, 26, 14)
    triangle = ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))
    r = ((xx - 46) ** 2 + (yy - 47) ** 2).sqrt()
    ring = (r <= 13) & (r >= 6)
    ellipse_vis = ellipse & ~triangle  # the triangle lies on top of the ellipse
    ring_vis = ring & ~triangle
    colors = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.3, 0.3, 0.9]])
    img = torch.full((3, H, W), 0.5)
    img = img + 0.05 * torch.randn(3, H, W, generator=torch.Generator().manual_seed(1))
    for m, c in zip((ellipse_vis, triangle, ring_vis), colors, strict=True):
        img = torch.where(m[None], c[:, None, None], img)
    return img, torch.stack([ellipse_vis, triangle, ring_vis])


def mask_box(m: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def fake_detector_output(img: torch.Tensor, boxes_xyxy: torch.Tensor, g: torch.Generator) -> DetectorOutput:
    """Features = fixed random projections of s×s pixel patches (stride s), as a frozen DETR would carry."""

    def proj(stride: int, ch: int) -> torch.Tensor:
        patches = F.pixel_unshuffle(img[None], stride)  # [1, 3·s², H/s, W/s]
        w = torch.randn(ch, patches.shape[1], generator=g) / math.sqrt(patches.shape[1])
        return torch.einsum("oc,bchw->bohw", w, patches - 0.5)

    k = boxes_xyxy.shape[0]
    b = boxes_xyxy / torch.tensor([W, H, W, H])
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
    maps = [proj(s, D) for s in STRIDES]
    return DetectorOutput(
        queries=torch.randn(1, k, D, generator=g),
        boxes=cxcywh[None],
        logits=torch.tensor([-3.0, 3.0]).expand(1, k, 2),
        enc_maps={4: maps},
        c1=proj(4, 48),
        input_hw=torch.tensor([[H, W]]),
        orig_hw=torch.tensor([[H, W]]),
        level_valid_hw=torch.tensor([[[m.shape[-2], m.shape[-1]] for m in maps]]),
    ).validate()


def tiny_default_config() -> MaskNetConfig:
    """The paper's default component set at toy width."""
    return MaskNetConfig(
        num_queries=4,
        roi_size=16,
        neck=NeckConfig(groups=8),
        image_encoder=ImageEncoderConfig(block="deformable", layers=1, heads=4, points=4),
        box_encoder=BoxEncoderConfig(block="deformable", layers=1, dim=16, heads=4, points=4),
        query_encoder=QueryEncoderConfig(ffn=True, b2o=True, heads=4),
        mask_scoring=MaskScoringConfig(channels=16, convs=2, pool=2, fc_dim=16, fc_layers=1),
    )


def test_overfit_one_synthetic_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    img, masks = synthetic_scene()
    gt_boxes = torch.tensor([mask_box(m) for m in masks])
    jitter = gt_boxes[2] + torch.tensor([1.5, -1.0, 2.0, 0.5])  # a loose duplicate of the ring box
    det = fake_detector_output(img, torch.cat([gt_boxes, jitter[None]]), g)
    gt = GTInstances(
        boxes=gt_boxes,
        labels=torch.tensor([1, 1, 1]),
        masks=masks,
        iscrowd=torch.zeros(3, dtype=torch.bool),
        image_id=1,
        orig_hw=(H, W),
    )
    net = build_masknet(tiny_default_config(), d_model=D, level_strides=STRIDES, c1_channels=48)
    crit = MaskCriterion(loss_cfg=LossConfig(), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-5)

    def pasted_iou() -> list[float]:
        with torch.no_grad():
            out = net(det)
            pm, _ = paste_masks(out.mask_logits[0].sigmoid(), pred_boxes_original(det)[0], (H, W))
        return [float((pm[i] & masks[i]).sum() / (pm[i] | masks[i]).sum()) for i in range(3)]

    start = pasted_iou()
    first = last = None
    for step in range(400):
        out = net(det)
        losses = crit(out, det, [gt])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        if first is None:
            first = losses
        last = losses
        if step % 25 == 24 and min(pasted_iou()) > 0.92:
            break
    assert first is not None and last is not None
    assert int(first["num_pos"]) == 4  # 3 GT boxes + the jittered duplicate (box-IoU assignment)
    ious = pasted_iou()
    assert sum(start) / 3 < 0.6, start  # the untrained network does not segment the shapes
    assert min(ious) > 0.9, (start, ious, step)
    assert last["loss"].item() < 0.5 * first["loss"].item()
    # the mask-scoring head learned the IoU of its masks
    with torch.no_grad():
        out = net(det)
    assert out.iou_pred is not None
    assert float((out.iou_pred[0, :3] - torch.tensor(ious)).abs().max()) < 0.15
    # end to end: COCO results of the three GT-box queries evaluate as near-perfect masks
    three = MaskNetOutput(**{**vars(out), "mask_logits": out.mask_logits[:, :3], "iou_pred": out.iou_pred[:, :3]})
    res = masks_to_coco_results(three, det, (0, 1), [1], score="mask_iou")
    assert len(res) == 3
    stats = coco_segm_stats(tmp_path, masks, res)
    assert stats[1] == pytest.approx(1.0) and stats[0] > 0.6  # AP50, AP


def coco_segm_stats(tmp_path: Path, masks: torch.Tensor, res: list[dict]) -> list[float]:
    anns = []
    for i, m in enumerate(masks.numpy().astype(np.uint8)):
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": float(m.sum()),
                "bbox": mask_box(masks[i]),
                "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
            }
        )
    p = tmp_path / "gt.json"
    p.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "height": H, "width": W}],
                "annotations": anns,
                "categories": [{"id": 1, "name": "shape"}],
            }
        )
    )
    gt = COCO(str(p))
    ev = COCOeval(gt, gt.loadRes(res), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(x) for x in ev.stats]
