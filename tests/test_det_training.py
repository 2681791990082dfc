"""Detector training: matcher optimality, set criterion, training forward, one-step learning, the loop
(seeded determinism, exact resume), the `demo` preset (registration, ≤ 20 MB weights, strict reload)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from mfdetr.contracts import ImageBatch
from mfdetr.detectors import build_detector, get_preset
from mfdetr.detectors.training import (
    FOCAL_PRIOR,
    MAX_WEIGHTS_BYTES,
    DetectionTrainSet,
    HungarianMatcher,
    SetCriterion,
    build_trainable,
    dino_train_forward,
    epoch_batches,
    weights_state,
)
from mfdetr.detectors.training.data import min_batches
from mfdetr.engine.training.detector import train_detector
from tests._det_training_data import TINY, tiny_cfg, toy_batch

pytestmark = pytest.mark.usefixtures("tiny_preset")  # the tiny DINO preset, registered for this module


# --- matcher ----------------------------------------------------------------------------------------
def test_matcher_is_optimal_on_small_cases() -> None:
    torch.manual_seed(0)
    m = HungarianMatcher()
    for q, n in ((4, 3), (5, 5), (3, 1)):
        logits = torch.randn(1, q, 4)
        boxes = torch.rand(1, q, 4) * 0.5 + 0.25
        t = {"labels": torch.randint(0, 4, (n,)), "boxes": torch.rand(n, 4) * 0.5 + 0.25}
        cost = m.cost_matrix(logits[0], boxes[0], t["labels"], t["boxes"])
        ((qi, ti),) = m(logits, boxes, [t])
        assert len(qi) == n and len(set(qi.tolist())) == n and sorted(ti.tolist()) == list(range(n))
        got = float(cost[qi, ti].sum())
        best = min(sum(float(cost[p[j], j]) for j in range(n)) for p in itertools.permutations(range(q), n))
        assert got == pytest.approx(best, abs=1e-5)


def test_matcher_prefers_the_right_box_and_class() -> None:
    m = HungarianMatcher()
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]])
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])
    t = {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.7, 0.7, 0.3, 0.3], [0.2, 0.2, 0.1, 0.1]])}
    ((qi, ti),) = m(logits, boxes, [t])
    assert dict(zip(qi.tolist(), ti.tolist(), strict=True)) == {0: 1, 1: 0}
    ((qe, te),) = m(logits, boxes, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert qe.numel() == 0 and te.numel() == 0


# --- model / criterion ------------------------------------------------------------------------------
def test_training_init_and_forward_match_inference() -> None:
    model = build_trainable(TINY, seed=0)
    prior = -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR)
    assert torch.allclose(model.class_embed[0].bias, torch.full_like(model.class_embed[0].bias, prior))
    assert torch.allclose(model.transformer.enc_out_class_embed.bias, torch.full((91,), prior))
    assert all(p.requires_grad for p in model.parameters()) and model.training
    images, pad, _ = toy_batch()
    model.eval()
    with torch.no_grad():  # trained layers end in a LayerNorm with learned affine: the heads must see decoder.norm
        for layer in model.transformer.decoder.layers:
            layer.norm3.weight.uniform_(0.5, 2.0)
            layer.norm3.bias.normal_()
        fwd = dino_train_forward(model, images, pad)
        ref = model.forward_detr(images, pad)
    assert len(fwd.layer_logits) == 2 and fwd.enc_logits.shape == fwd.logits.shape == (2, 20, 91)
    torch.testing.assert_close(fwd.logits, ref.logits)
    torch.testing.assert_close(fwd.boxes, ref.boxes)
    assert fwd.enc_boxes.shape == (2, 20, 4) and bool(((fwd.enc_boxes >= 0) & (fwd.enc_boxes <= 1)).all())


def test_criterion_finite_for_empty_targets_and_covers_every_set() -> None:
    model = build_trainable(TINY, seed=0)
    images, pad, targets = toy_batch()
    crit = SetCriterion(matcher=HungarianMatcher())
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    loss, log = crit(dino_train_forward(model, images, pad), empty)
    assert math.isfinite(float(loss.detach())) and log["loss_bbox"] == 0.0 and log["loss_giou"] == 0.0
    loss.backward()
    assert model.class_embed[0].bias.grad is not None and torch.isfinite(model.class_embed[0].bias.grad).all()
    _, full = crit(dino_train_forward(model, images, pad), targets)
    _, no_enc = SetCriterion(matcher=HungarianMatcher(), enc=False)(dino_train_forward(model, images, pad), targets)
    assert full["loss_enc"] > 0 and full["loss_aux"] > 0 and "loss_enc" not in no_enc
    assert full["loss"] == pytest.approx(no_enc["loss"] + full["loss_enc"], rel=1e-5)


def test_optimisation_steps_reduce_the_loss() -> None:
    torch.set_num_threads(1)
    model = build_trainable(TINY, seed=0)
    images, pad, targets = toy_batch()
    crit = SetCriterion(matcher=HungarianMatcher())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _ = crit(dino_train_forward(model, images, pad), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


# --- data / loop ------------------------------------------------------------------------------------
def test_train_set_boxes_flips_and_batches(toy_coco: Path, tiny_preset) -> None:
    ds = DetectionTrainSet(
        toy_coco, "train2017", preprocessing=tiny_preset.preprocessing, class_to_category=tiny_preset.class_to_category
    )
    img, t = ds.item(1)
    assert img.shape == (3, 64, 80) and t["labels"].tolist() == [2]  # category 2 → slot 2 (identity map)
    flipped, tf = ds.item(1, flip=True)
    torch.testing.assert_close(flipped, img.flip(-1))
    torch.testing.assert_close(tf["boxes"][:, 0], 1 - t["boxes"][:, 0])
    batches = epoch_batches(ds.groups, 2, seed=0, epoch=0)
    assert batches == epoch_batches(ds.groups, 2, seed=0, epoch=0) != epoch_batches(ds.groups, 2, seed=0, epoch=1)
    assert all(len({ds.groups[i] for i in b}) == 1 for b in batches) and len(batches) >= min_batches(ds.groups, 2)
    for idx in batches:  # one input size per batch: no padding at all (DINO is not padding-invariant)
        b = ds.batch(idx, hflip=0.5)
        assert b.images.shape[0] == 2 and not bool(b.pad_mask.any())
    by_orientation = DetectionTrainSet(
        toy_coco,
        "train2017",
        preprocessing=tiny_preset.preprocessing,
        class_to_category=tiny_preset.class_to_category,
        by_size=False,
    )
    assert sorted(set(by_orientation.groups)) == [0, 1]
    for epoch in range(5):
        assert len(epoch_batches(ds.groups, 3, seed=1, epoch=epoch)) >= min_batches(ds.groups, 3)


def test_loop_is_seeded_and_resumes_exactly(toy_coco: Path, tmp_path: Path) -> None:
    s1 = train_detector(tiny_cfg(toy_coco), tmp_path / "a", max_steps=4, log=lambda s: None)
    s2 = train_detector(tiny_cfg(toy_coco), tmp_path / "b", max_steps=2, log=lambda s: None)
    s3 = train_detector(tiny_cfg(toy_coco), tmp_path / "b", max_steps=4, log=lambda s: None)  # resumes at 2
    assert s1["steps"] == s3["steps"] == 4 and s2["steps"] == 2
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s4 = train_detector(tiny_cfg(toy_coco, seed=4), tmp_path / "c", max_steps=1, log=lambda s: None)
    assert s4["loss"] != pytest.approx(s1["loss"])
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("val" in r and 0.0 <= r["val"]["AP"] <= 100.0 for r in rows)  # epoch 1 ends at step 4


def test_full_run_writes_weights_that_load_strictly(toy_coco: Path, tmp_path: Path, tiny_preset) -> None:
    s = train_detector(tiny_cfg(toy_coco, epochs=1), tmp_path / "r", log=lambda s: None)
    assert s["steps"] == s["total_steps"] == 4
    from mfdetr.detectors.dino import build_dino
    from mfdetr.detectors.dino.config import DinoConfig

    det = build_dino(
        DinoConfig.from_dict(tiny_preset.arch), preset=tiny_preset, checkpoint=tmp_path / "r" / "weights.pt"
    )
    assert not det.training and not any(p.requires_grad for p in det.parameters())


# --- the demo preset --------------------------------------------------------------------------------
def test_demo_preset_small_weights_and_strict_reload() -> None:
    preset = get_preset("demo")
    assert preset.hidden_dim == 128 and preset.level_strides == (8, 16, 32) and preset.c1_channels == 32
    assert preset.num_encoder_layers == 3 and preset.preprocessing.short_side == 160
    assert preset.class_to_category == (1, 2, 3, 4, 5, 6)
    model = build_trainable("demo", seed=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.body.modules())  # trainable BN
    sd = weights_state(model)
    nbytes = sum(v.numel() * v.element_size() for v in {v.data_ptr(): v for v in sd.values()}.values())
    assert nbytes <= MAX_WEIGHTS_BYTES
    det = build_detector("demo", checkpoint={"model": sd})
    x = torch.randn(1, 3, 160, 200)
    batch = ImageBatch(
        images=x,
        pad_mask=torch.zeros(1, 160, 200, dtype=torch.bool),
        input_hw=torch.tensor([[160, 200]]),
        orig_hw=torch.tensor([[160, 200]]),
        image_ids=[1],
        file_names=["x"],
        targets=None,
    )
    out = det.detect(batch, topk=10, enc_layers=(3,))
    assert out.c1.shape == (1, 32, 40, 50) and out.queries.shape == (1, 10, 128)


def test_sampling_projections_get_a_tenth_of_the_lr() -> None:
    from mfdetr.detectors.training.recipe import OptimOptions, param_groups

    model = build_trainable(TINY, seed=0)
    groups = param_groups(model, OptimOptions(linear_proj_lr_mult=0.1))
    assert [g["lr_mult"] for g in groups] == [1.0, 0.1]
    slow = {id(p) for p in groups[1]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in slow]
    assert names and all("sampling_offsets" in n or "reference_points" in n for n in names)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_cli_reports_user_errors_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdetr.detectors.training.__main__ import main

    # in this process: an exception escaping main() would fail the test with its traceback
    rc = main(["train", "--recipe", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().startswith("mfdetr: error:") and "nope.toml" in err


def test_box_ap_is_100_for_a_detector_that_returns_the_ground_truth(toy_coco: Path, tiny_preset) -> None:
    from mfdetr.data import CocoInstances
    from mfdetr.detectors.common import Detections
    from mfdetr.detectors.training import box_ap

    gt = CocoInstances(toy_coco, "val2017", preprocessing=tiny_preset.preprocessing)

    class Oracle(torch.nn.Module):
        preset = tiny_preset

        def predict(self, batch: ImageBatch) -> list[Detections]:
            out = []
            for image_id in batch.image_ids:
                t = gt.load_targets(image_id)
                n = len(t)
                out.append(
                    Detections(
                        scores=torch.linspace(0.9, 0.5, n), category_ids=t.labels, labels=t.labels, boxes=t.boxes
                    )
                )
            return out

    ap = box_ap(Oracle(), toy_coco, "val2017")  # type: ignore[arg-type]
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    ap2 = box_ap(Oracle(), toy_coco, "val2017", max_images=2)  # type: ignore[arg-type]
    assert ap2["AP"] == pytest.approx(100.0)


def test_shipped_demo_weights_or_a_clear_error() -> None:
    from mfdetr.detectors.dino.demo import DEMO_CHECKPOINT
    from mfdetr.errors import MfdetrError

    if DEMO_CHECKPOINT.is_file():  # shipped: small, loads strictly into the frozen preset
        assert DEMO_CHECKPOINT.stat().st_size <= MAX_WEIGHTS_BYTES
        det = build_detector("demo")
        assert not det.training
    else:
        with pytest.raises(MfdetrError, match="demo_dino.toml"):
            build_detector("demo")


def test_export_cli_writes_loadable_weights(toy_coco: Path, tmp_path: Path, tiny_preset, capsys) -> None:
    from mfdetr.detectors.dino import build_dino
    from mfdetr.detectors.dino.config import DinoConfig
    from mfdetr.detectors.training.__main__ import main

    train_detector(tiny_cfg(toy_coco), tmp_path / "r", max_steps=1, log=lambda s: None)
    assert main(["export", str(tmp_path / "r" / "checkpoint.pt"), str(tmp_path / "w.pt")]) == 0
    det = build_dino(DinoConfig.from_dict(tiny_preset.arch), preset=tiny_preset, checkpoint=tmp_path / "w.pt")
    ref = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, ref[k]) for k, v in det.state_dict().items())
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]) == 2
    assert "mfdetr: error:" in capsys.readouterr().err


def test_weights_state_keeps_shared_heads_shared_and_halves_when_too_big() -> None:
    model = build_trainable(TINY, seed=0)
    sd = weights_state(model)
    assert sd["class_embed.0.weight"].data_ptr() == sd["class_embed.1.weight"].data_ptr()
    small = weights_state(model, max_bytes=1000)
    assert small["class_embed.0.weight"].dtype == torch.float16
    assert small["class_embed.0.weight"].data_ptr() == small["transformer.decoder.class_embed.0.weight"].data_ptr()
