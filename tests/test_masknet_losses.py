"""Point sampling, mask losses and the criterion of the mask network (mfdetr.masknet.losses/criterion)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mfdetr.config import from_dict
from mfdetr.errors import MfdetrError
from mfdetr.masknet.criterion import MaskCriterion
from mfdetr.masknet.losses import (
    LossConfig,
    dice_loss,
    mask_iou,
    mask_losses,
    point_sample,
    sample_points,
    sigmoid_bce_loss,
)
from mfdetr.masknet.targets import AssignConfig
from tests._masknet_data import make_det, make_gt


@dataclass
class Out:
    mask_logits: torch.Tensor
    iou_pred: torch.Tensor | None


def test_config_defaults_and_toml_compat() -> None:
    cfg = LossConfig()
    assert cfg.points_for((32, 32)) == 256  # 75 % fewer supervised points (appendix A)
    assert (cfg.oversample_ratio, cfg.importance_sample_ratio) == (3.0, 0.75)
    cfg2 = from_dict(LossConfig, {"num_points": 100, "point_sampling": False, "iou_weight": 2})
    assert cfg2.points_for((32, 32)) == 100 and cfg2.iou_weight == 2.0
    with pytest.raises(MfdetrError):
        from_dict(LossConfig, {"importance_sample_ratio": 1.5})
    with pytest.raises(MfdetrError):
        from_dict(LossConfig, {"num_point": 3})
    a = from_dict(AssignConfig, {"method": "hungarian", "iou_threshold": 0.6})
    assert a.method == "hungarian"
    with pytest.raises(MfdetrError):
        from_dict(AssignConfig, {"method": "maxiou"})


def test_point_sample_reads_cell_centres() -> None:
    m = torch.arange(12.0).reshape(1, 1, 3, 4)
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [1.5 / 4, 1.5 / 3]]])
    assert point_sample(m, coords)[0, 0].tolist() == pytest.approx([0.0, 11.0, 5.0], abs=1e-5)


def test_sample_points_counts_and_importance() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.full((4, 1, 32, 32), 10.0)
    logits[..., :16] = 0.0  # left half uncertain
    pts = sample_points(logits, 256, 3.0, 0.75, generator=g)
    assert pts.shape == (4, 256, 2) and float(pts.min()) >= 0 and float(pts.max()) <= 1
    left = (pts[..., 0] < 0.5).float().mean().item()
    # 192 uncertain points (all in the left half, 768 candidates hold ~384 there) + 64 uniform ones
    assert left == pytest.approx(0.75 + 0.25 * 0.5, abs=0.05)
    uni = sample_points(logits, 256, 3.0, 0.0, generator=g)
    assert uni.shape == (4, 256, 2)
    assert (uni[..., 0] < 0.5).float().mean().item() == pytest.approx(0.5, abs=0.06)
    assert sample_points(logits, 10, 2.0, 1.0, generator=g).shape == (4, 10, 2)


def test_perfect_and_wrong_predictions() -> None:
    t = torch.zeros(2, 16, 16)
    t[:, 4:12, 4:12] = 1
    good = (t * 2 - 1) * 20
    full = mask_losses(good, t, LossConfig(point_sampling=False), iou_pred=torch.ones(2))
    assert full["loss_mask_bce"].item() < 1e-6 and full["loss_mask_dice"].item() < 1e-6
    assert full["loss_mask_iou"].item() < 1e-9
    # sampled points between a fg and a bg cell read a 0.5 target and a ~0 logit (bilinear): the
    # loss of a perfect grid prediction is then the entropy floor there, far below a wrong prediction
    pts = mask_losses(good, t, LossConfig(), iou_pred=torch.ones(2), generator=torch.Generator().manual_seed(0))
    for cfg in (LossConfig(point_sampling=False), LossConfig()):
        bad = mask_losses(-good, t, cfg, iou_pred=torch.ones(2), generator=torch.Generator().manual_seed(0))
        assert bad["loss_mask_bce"].item() > 5 and bad["loss_mask_dice"].item() > 0.8
        assert bad["loss_mask_iou"].item() == pytest.approx(1.0)  # IoU target 0, prediction 1 (mean of 2)
        assert bad["loss"].item() == pytest.approx(
            sum(bad[k].item() for k in ("loss_mask_bce", "loss_mask_dice", "loss_mask_iou"))
        )
        assert pts["loss"].item() < 0.1 * bad["loss"].item()


def test_point_losses_have_no_border_bias() -> None:
    # a box-filling object predicted perfectly: no sampled point may see a softened edge
    t = torch.ones(3, 8, 8)
    ls = mask_losses(
        torch.full((3, 8, 8), 20.0),
        t,
        LossConfig(num_points=64, importance_sample_ratio=0.5),
        generator=torch.Generator().manual_seed(0),
    )
    assert ls["loss_mask_bce"].item() < 1e-6 and ls["loss_mask_dice"].item() < 1e-6


def test_bce_dice_hand_values() -> None:
    x = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    assert sigmoid_bce_loss(x, t).item() == pytest.approx(0.693147, abs=1e-5)
    # p = 0.5 each: 1 - (2·0.5 + 1)/(1 + 1 + 1) = 1/3
    assert dice_loss(x, t).item() == pytest.approx(1 / 3, abs=1e-6)


def test_iou_target() -> None:
    t = torch.zeros(1, 8, 8)
    t[0, :, :4] = 1  # 32 cells
    pred = torch.full((1, 8, 8), -3.0)
    pred[0, :, :2] = 3.0  # 16 cells, all inside
    assert mask_iou(pred, t).item() == pytest.approx(0.5)
    # the whole GT is twice what the box shows: union 64
    assert mask_iou(pred, t, torch.tensor([64.0])).item() == pytest.approx(0.25)
    assert mask_iou(torch.full((1, 8, 8), -1.0), torch.zeros(1, 8, 8)).item() == 0.0
    # the L2 loss uses it (detached) against the prediction
    ls = mask_losses(pred, t, LossConfig(iou_target_full_gt=False), iou_pred=torch.tensor([0.3]))
    assert ls["loss_mask_iou"].item() == pytest.approx(0.04, abs=1e-6)


def test_no_positive_losses_are_zero_and_backprop() -> None:
    logits = torch.randn(0, 8, 8, requires_grad=True)
    ls = mask_losses(logits, torch.zeros(0, 8, 8), LossConfig(), iou_pred=torch.zeros(0, requires_grad=True))
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in ls.values())
    ls["loss"].backward()


def _crit_case(
    boxes: list[list[float]],
    gt_rects: list[tuple[int, int, int, int]],
    *,
    iou: bool = True,
    crowd: list[bool] | None = None,
    assign_cfg: AssignConfig | None = None,
) -> dict[str, torch.Tensor]:
    det = make_det(boxes, (64, 64), labels=[1] * len(boxes))
    gt = make_gt(gt_rects, (64, 64), crowd=crowd)
    k = len(boxes)
    logits = torch.randn(1, k, 16, 16, requires_grad=True)
    iou_pred = torch.rand(1, k, requires_grad=True) if iou else None
    crit = MaskCriterion(
        loss_cfg=LossConfig(),
        assign_cfg=assign_cfg or AssignConfig(),
        class_to_category=(0, 1, 2, 3),
        generator=torch.Generator().manual_seed(0),
    )
    ls = crit(Out(logits, iou_pred), det, [gt])
    ls["loss"].backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    if iou_pred is not None:
        assert iou_pred.grad is not None and bool(torch.isfinite(iou_pred.grad).all())
    assert all(bool(torch.isfinite(v).all()) for v in ls.values())
    return ls


def test_criterion_edge_cases_are_finite() -> None:
    ls = _crit_case([[10, 10, 30, 30], [40, 40, 60, 60]], [(10, 10, 30, 30)])
    assert ls["num_pos"].item() == 1 and ls["loss"].item() > 0
    assert _crit_case([[10, 10, 30, 30]], [])["loss"].item() == 0.0  # no GT
    assert _crit_case([[40, 40, 60, 60]], [(0, 0, 10, 10)])["loss"].item() == 0.0  # no match
    assert _crit_case([[10, 10, 30, 30]], [(10, 10, 30, 30)], crowd=[True])["num_pos"].item() == 0  # crowd only
    # tiny and degenerate boxes (zero width / height, a point) matched one-to-one
    tiny = _crit_case(
        [[5, 5, 5, 5], [5, 5, 5.01, 9], [3, 3, 3.5, 3.5]],
        [(5, 5, 6, 6), (3, 3, 4, 4)],
        assign_cfg=AssignConfig(method="hungarian", hungarian_cost="iou"),
    )
    assert tiny["num_pos"].item() == 2
    assert _crit_case([[10, 10, 30, 30]], [(10, 10, 30, 30)], iou=False)["loss_mask_iou"].item() == 0.0


def test_criterion_perfect_prediction_near_zero() -> None:
    det = make_det([[8, 8, 40, 40], [0, 0, 4, 4]], (64, 64))
    gt = make_gt([(8, 8, 24, 40)], (64, 64))  # left half of box 0
    logits = torch.full((1, 2, 16, 16), -30.0)
    logits[0, 0, :, :8] = 30.0
    ls = MaskCriterion()(Out(logits, torch.tensor([[1.0, 0.3]])), det, [gt])
    assert ls["num_pos"].item() == 1 and ls["pos_mask_iou"].item() == pytest.approx(1.0)
    assert ls["loss_mask_iou"].item() < 1e-9  # predicted IoU 1 = target (whole GT inside the box)
    full = MaskCriterion(loss_cfg=LossConfig(point_sampling=False))(Out(logits, torch.tensor([[1.0, 0.3]])), det, [gt])
    assert full["loss"].item() < 1e-6
    with pytest.raises(ValueError, match="mask_logits"):
        MaskCriterion()(Out(torch.cat([logits, logits[:, :1]], 1), None), det, [gt])
    # the network may segment only the top K' < K queries
    top1 = MaskCriterion(loss_cfg=LossConfig(point_sampling=False))(Out(logits[:, :1], None), det, [gt])
    assert top1["num_pos"].item() == 1 and top1["loss"].item() < 1e-6


@dataclass
class GridOut:
    mask_logits: torch.Tensor
    iou_pred: torch.Tensor | None
    roi: bool = False


def test_criterion_on_input_grid_masks() -> None:
    # non-RoI masks on the padded stride-4 grid (10×10) of a 32×32 input of a 64×64 original image
    det = make_det([[0, 0, 32, 32], [40, 40, 60, 60]], (64, 64), input_hw=(32, 32))
    gt = make_gt([(0, 0, 32, 32)], (64, 64))  # top-left quarter of the image = grid cells [0:4, 0:4]
    logits = torch.full((1, 2, 10, 10), -30.0)
    logits[0, 0, :4, :4] = 30.0
    crit = MaskCriterion(loss_cfg=LossConfig(point_sampling=False))
    ls = crit(GridOut(logits, None), det, [gt])
    assert ls["num_pos"].item() == 1 and ls["loss"].item() < 1e-6
    logits[0, 0, 4, 4] = 30.0  # one wrong cell
    assert crit(GridOut(logits, None), det, [gt])["pos_mask_iou"].item() == pytest.approx(16 / 17)
