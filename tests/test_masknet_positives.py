"""Training MaskNet on the positives only (mfdetr.masknet.positives): exactly the all-queries losses and
gradients (float64), the object-to-object fallback, and the seeded cap on positives per image."""

from __future__ import annotations

import pytest
import torch

from mfdetr.config import from_dict
from mfdetr.contracts import DetectorOutput, GTInstances
from mfdetr.errors import MfdetrError
from mfdetr.masknet import MaskNet
from mfdetr.masknet.criterion import MaskCriterion
from mfdetr.masknet.losses import LossConfig
from mfdetr.masknet.positives import PositivesOnly, cap_positives, cap_seed
from mfdetr.masknet.targets import AssignConfig, Assignment, assign
from tests._masknet_models import K, det64, gts_for, model64


def run(
    model: MaskNet,
    det: DetectorOutput,
    gts: list[GTInstances],
    *,
    positives: bool,
    assign_cfg: AssignConfig | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor | None], int]:
    """Losses, parameter gradients and the number of RoIs the box encoder saw, for one step."""
    crit = MaskCriterion(
        loss_cfg=LossConfig(),
        assign_cfg=assign_cfg or AssignConfig(),
        class_to_category=tuple(range(7)),
        generator=torch.Generator().manual_seed(5),
        seed=3,
    )
    model.zero_grad(set_to_none=True)
    seen = []
    hook = (
        None
        if model.box_encoder is None
        else model.box_encoder.register_forward_hook(lambda m, inp, out: seen.append(int(out.shape[0])))
    )
    out = PositivesOnly(model, crit)(det, gts, step=7) if positives else model(det)
    if hook is not None:
        hook.remove()
    losses = crit(out, det, gts, step=7)
    losses["loss"].backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return {k: float(v.detach()) for k, v in losses.items()}, grads, sum(seen)


def assert_same(a: tuple, b: tuple) -> None:
    la, ga, _ = a
    lb, gb, _ = b
    assert la.keys() == lb.keys()
    for k in la:
        assert abs(la[k] - lb[k]) <= 1e-10, (k, la[k], lb[k])
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            assert float((ga[n] - gb[n]).abs().max()) <= 1e-10, (n, float((ga[n] - gb[n]).abs().max()))


@pytest.mark.parametrize("method", ["box_iou", "hungarian"])
def test_positives_only_equals_all_queries_normal_batch(method: str) -> None:
    det = det64()
    gts = gts_for(det, [[0, 2, 3], [1, 4]])
    cfg = AssignConfig(method=method)
    model = model64()
    full = run(model, det, gts, positives=False, assign_cfg=cfg)
    pos = run(model, det, gts, positives=True, assign_cfg=cfg)
    npos = int(full[0]["num_pos"])
    assert 0 < npos < 2 * K and pos[0]["num_pos"] == npos
    assert full[2] == 2 * K and pos[2] == npos  # the box branch ran on the positives only
    assert full[0]["loss"] > 0 and pos[0]["pos_per_image"] == npos / 2
    assert_same(full, pos)
    moved = [n for n, g in pos[1].items() if g is not None and float(g.abs().max()) > 0]
    assert any(n.startswith("box_encoder.") for n in moved) and any(n.startswith("image_encoder.") for n in moved)


def test_positives_only_equals_all_queries_without_positive() -> None:
    det = det64()
    gts = gts_for(det, [[], []])
    model = model64()
    full = run(model, det, gts, positives=False)
    pos = run(model, det, gts, positives=True)
    assert full[0]["num_pos"] == 0 and full[0]["loss"] == 0.0
    assert pos[2] == 1  # one query keeps the branch in the graph
    assert_same(full, pos)
    # every parameter still gets a (zero) gradient: data-parallel reducers see them all
    assert all(g is not None and float(g.abs().max()) == 0.0 for g in pos[1].values())


def test_positives_only_equals_all_queries_when_all_are_positive() -> None:
    det = det64()
    gts = gts_for(det, [list(range(K)), list(range(K))])
    model = model64()
    full = run(model, det, gts, positives=False)
    pos = run(model, det, gts, positives=True)
    assert full[0]["num_pos"] == 2 * K and pos[2] == 2 * K
    assert_same(full, pos)


def test_object_to_object_attention_falls_back_to_all_queries() -> None:
    det = det64()
    gts = gts_for(det, [[0, 2, 3], [1, 4]])
    model = model64(("query_encoder.o2o=true",))
    assert model.queries_interact
    full = run(model, det, gts, positives=False)
    pos = run(model, det, gts, positives=True)
    assert pos[2] == 2 * K  # queries interact: all K computed, the positives' rows taken
    assert 0 < pos[0]["num_pos"] < 2 * K
    assert_same(full, pos)


@pytest.mark.parametrize(
    "overrides",
    [
        ("box_encoder.block=swin", "box_encoder.heads=4", "mask_head.kind=segmenter"),
        ("box_encoder.block=convnext", "image_encoder.block=convnext", "query_encoder.b2o=false"),
    ],
    ids=["swin+segmenter", "convnext"],
)
def test_positives_only_equals_all_queries_for_other_blocks(overrides: tuple[str, ...]) -> None:
    det = det64()
    gts = gts_for(det, [[0, 2, 3], [1, 4]])
    model = model64(overrides)
    full = run(model, det, gts, positives=False)
    pos = run(model, det, gts, positives=True)
    assert pos[2] == full[0]["num_pos"] < 2 * K
    assert_same(full, pos)


def test_non_roi_baseline_falls_back_to_all_queries() -> None:
    det = det64()
    model = model64(
        (
            "roi=false",
            "box_encoder.layers=0",
            "box_encoder.dim={d}",
            "query_encoder.ffn=false",
            "query_encoder.b2o=false",
            "mask_scoring.enabled=false",
            "image_encoder.layers=1",
        )
    )
    assert not model.roi and any(p.requires_grad for p in model.parameters())
    for gt_queries in ([[0, 2, 3], [1, 4]], [[], []]):
        gts = gts_for(det, gt_queries)
        full = run(model, det, gts, positives=False)
        pos = run(model, det, gts, positives=True)
        assert (full[0]["num_pos"] > 0) == bool(gt_queries[0])
        assert_same(full, pos)
        assert all(g is not None for g in pos[1].values())


def test_cap_is_applied_identically_on_both_paths() -> None:
    det = det64()
    gts = gts_for(det, [list(range(K)), [0, 2, 3]])
    cfg = AssignConfig(max_positives_per_image=2)
    model = model64()
    full = run(model, det, gts, positives=False, assign_cfg=cfg)
    pos = run(model, det, gts, positives=True, assign_cfg=cfg)
    assert full[0]["num_pos"] == 4 and pos[2] == 4
    assert_same(full, pos)


def test_selection_output_and_errors() -> None:
    det = det64()
    model = model64()
    out = model(det, select=(torch.tensor([1, 0]), torch.tensor([3, 5])))
    ref = model(det)
    assert out.selected is not None and tuple(out.mask_logits.shape) == (2, 8, 8)
    assert torch.allclose(out.mask_logits[0], ref.mask_logits[1, 3], atol=1e-12)
    assert torch.allclose(out.iou_pred, ref.iou_pred[[1, 0], [3, 5]], atol=1e-12)
    with pytest.raises(ValueError, match="select"):
        model(det, select=(torch.tensor([2]), torch.tensor([0])))
    with pytest.raises(ValueError, match="assignment"):
        MaskCriterion()(out, det, gts_for(det, [[0], [1]]))


def _assignment(counts: list[int]) -> Assignment:
    bi = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    qi = torch.cat([torch.arange(n) * 2 for n in counts])
    return Assignment(
        batch_idx=bi, query_idx=qi, gt_idx=torch.zeros_like(qi), ignored=torch.zeros(len(counts), 100, dtype=torch.bool)
    )


def test_cap_holds_is_seeded_and_is_identity_above_the_count() -> None:
    a = _assignment([40, 3, 0, 17])
    seeds = [cap_seed(0, 5, iid) for iid in (11, 12, 13, 14)]
    c = cap_positives(a, 8, seeds)
    counts = torch.bincount(c.batch_idx, minlength=4).tolist()
    assert counts == [8, 3, 0, 8]
    assert torch.equal(c.batch_idx, c.batch_idx.sort().values)  # still grouped by image, in order
    same = cap_positives(a, 8, [cap_seed(0, 5, iid) for iid in (11, 12, 13, 14)])
    assert torch.equal(same.query_idx, c.query_idx)
    other_step = cap_positives(a, 8, [cap_seed(0, 6, iid) for iid in (11, 12, 13, 14)])
    assert not torch.equal(other_step.query_idx, c.query_idx)
    other_seed = cap_positives(a, 8, [cap_seed(1, 5, iid) for iid in (11, 12, 13, 14)])
    assert not torch.equal(other_seed.query_idx, c.query_idx)
    # picks come from the assigned ones (a subset, with their GTs) and depend on the image, not its slot
    for b in (0, 3):
        kept = set(c.query_idx[c.batch_idx == b].tolist())
        assert kept <= set(a.query_idx[a.batch_idx == b].tolist())
    for cap in (40, 41, 0, None):
        same_a = cap_positives(a, cap, seeds)
        assert torch.equal(same_a.query_idx, a.query_idx) and torch.equal(same_a.batch_idx, a.batch_idx)


def test_cap_through_the_criterion_follows_seed_step_and_image() -> None:
    det = det64()
    gts = gts_for(det, [list(range(K)), list(range(K))])
    picks = {}
    for seed, step in ((0, 1), (0, 1), (0, 2), (1, 1)):
        crit = MaskCriterion(assign_cfg=AssignConfig(max_positives_per_image=3), seed=seed)
        a = crit.assign_targets(det, gts, step=step)
        assert torch.bincount(a.batch_idx, minlength=2).tolist() == [3, 3]
        picks.setdefault((seed, step), []).append(a.query_idx.tolist())
    assert picks[(0, 1)][0] == picks[(0, 1)][1]
    assert picks[(0, 1)][0] != picks[(0, 2)][0] and picks[(0, 1)][0] != picks[(1, 1)][0]
    uncapped = MaskCriterion(assign_cfg=AssignConfig(max_positives_per_image=K)).assign_targets(det, gts)
    ref = assign(det, gts, AssignConfig())
    assert torch.equal(uncapped.query_idx, ref.query_idx) and torch.equal(uncapped.gt_idx, ref.gt_idx)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_cap_value_is_validated(bad: object) -> None:
    with pytest.raises(MfdetrError, match="max_positives_per_image") as e:
        from_dict(AssignConfig, {"max_positives_per_image": bad}, where="assign")
    assert "\n" not in str(e.value)
    assert from_dict(AssignConfig, {"max_positives_per_image": None}).max_positives_per_image is None
