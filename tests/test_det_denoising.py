"""Contrastive denoising (DINO's CDN) for detector training: slot layout, noise bounds, attention
mask, that matching queries are untouched by the denoising slots, the loss, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfdetr.detectors.training import HungarianMatcher, SetCriterion, build_trainable, dino_train_forward
from mfdetr.detectors.training.denoising import cdn_attn_mask, prepare_cdn
from mfdetr.engine.training.detector import train_detector
from mfdetr.detectors.training.recipe import LossOptions
from tests._det_training_data import TINY, tiny_cfg, toy_batch

pytestmark = pytest.mark.usefixtures("tiny_preset")  # the tiny DINO preset, registered for this module

TARGETS = [
    {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
    {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def test_attention_mask_separates_groups_and_hides_them_from_matching_queries() -> None:
    m = cdn_attn_mask(groups=2, single_pad=2, num_queries=3)
    assert m.shape == (11, 11)
    assert bool(m[8:, :8].all()) and not bool(m[8:, 8:].any())  # matching queries: no denoising slot
    assert not bool(m[:8, 8:].any())  # denoising slots see the matching queries (official)
    assert not bool(m[:4, :4].any()) and bool(m[:4, 4:8].all()) and bool(m[4:8, :4].all())


def test_slot_layout_without_noise() -> None:
    enc = torch.nn.Embedding(7, 8)
    dn = prepare_cdn(
        TARGETS, label_enc=enc, num_classes=6, num_queries=5, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.0
    )
    assert dn is not None and dn.groups == 3 and dn.single_pad == 2 and dn.pad_size == 12
    assert dn.tgt.shape == (2, 12, 8) and dn.reference.shape == (2, 12, 4) and dn.attn_mask.shape == (17, 17)
    for b, t in enumerate(TARGETS):
        slots, gt = dn.positive_pairs(b)
        assert slots.tolist() == ([0, 1, 4, 5, 8, 9] if b == 0 else [0, 4, 8])
        assert gt.tolist() == ([0, 1] * 3 if b == 0 else [0, 0, 0])
        torch.testing.assert_close(dn.reference[b, slots], t["boxes"][gt], atol=1e-6, rtol=0)
        torch.testing.assert_close(dn.tgt[b, slots], enc(t["labels"][gt]))
        torch.testing.assert_close(dn.tgt[b, slots + 2], enc(t["labels"][gt]))  # the negative copies
    # image 1 has one GT: its second slot of every block is padding (zero content, box 0.5)
    assert not bool(dn.tgt[1, 1].any()) and torch.allclose(dn.reference[1, 1], torch.full((4,), 0.5))
    assert (
        prepare_cdn(
            [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
            label_enc=enc,
            num_classes=6,
            num_queries=5,
        )
        is None
    )


def test_noise_bounds_of_positives_and_negatives_and_seeded() -> None:
    from mfdetr.ops import box_cxcywh_to_xyxy

    enc = torch.nn.Embedding(7, 8)
    scale = 0.4
    t = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]  # no clamping possible

    def make(seed: int):
        return prepare_cdn(
            t,
            label_enc=enc,
            num_classes=6,
            num_queries=5,
            dn_number=50,
            label_noise_ratio=0.0,
            box_noise_scale=scale,
            generator=torch.Generator().manual_seed(seed),
        )

    dn = make(0)
    assert dn is not None and dn.groups == 50
    delta = (box_cxcywh_to_xyxy(dn.reference[0]) - box_cxcywh_to_xyxy(t[0]["boxes"])).abs()  # [100, 4]
    half = 0.1 * scale
    assert bool((delta[0::2] <= half + 1e-5).all()) and bool((delta[1::2] >= half - 1e-5).all())
    assert bool((delta[1::2] <= 2 * half + 1e-5).all())
    torch.testing.assert_close(make(0).reference, dn.reference)
    assert not torch.equal(make(1).reference, dn.reference)
    flipped = prepare_cdn(
        t * 1,
        label_enc=enc,
        num_classes=6,
        num_queries=5,
        dn_number=50,
        label_noise_ratio=1.0,
        box_noise_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert flipped is not None
    frac = (flipped.tgt[0] - enc(torch.tensor([1]))).abs().sum(-1).gt(0).float().mean()
    assert 0.25 < float(frac) < 0.6  # about half the labels were redrawn (5/6 of those to another class)


def test_denoising_slots_leave_the_matching_queries_unchanged_and_get_a_loss() -> None:
    model = build_trainable(TINY, seed=0)
    images, pad, targets = toy_batch()
    dn = prepare_cdn(
        targets,
        label_enc=model.label_enc,
        num_classes=91,
        num_queries=model.transformer.num_queries,
        dn_number=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert dn is not None
    model.eval()
    with torch.no_grad():
        plain = dino_train_forward(model, images, pad)
        with_dn = dino_train_forward(model, images, pad, dn)
    for a, b in zip(plain.layer_logits + plain.layer_boxes, with_dn.layer_logits + with_dn.layer_boxes, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert with_dn.dn_logits is not None and with_dn.dn_logits[-1].shape == (2, dn.pad_size, 91)
    model.train()
    crit = SetCriterion(matcher=HungarianMatcher())
    loss, log = crit(dino_train_forward(model, images, pad, dn), targets)
    _, log_plain = crit(dino_train_forward(model, images, pad), targets)
    assert log["loss_dn"] > 0 and "loss_dn" not in log_plain
    loss.backward()
    assert model.label_enc.weight.grad is not None and bool(model.label_enc.weight.grad[1].abs().sum() > 0)


def test_training_with_denoising_is_seeded_and_resumes_exactly(toy_coco: Path, tmp_path: Path) -> None:
    def cfg():  # noqa: ANN202
        c = tiny_cfg(toy_coco)
        c.loss = LossOptions(dn_number=10)
        return c

    train_detector(cfg(), tmp_path / "a", max_steps=3, log=lambda s: None)
    train_detector(cfg(), tmp_path / "b", max_steps=2, log=lambda s: None)
    train_detector(cfg(), tmp_path / "b", max_steps=3, log=lambda s: None)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("loss_dn", 0.0) > 0 for r in rows if "loss" in r)  # batches without GT have none
