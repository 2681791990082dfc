from __future__ import annotations

import pytest
import torch

from mfdetr.contracts import DetectorOutput, DetectorPreset, Preprocessing, coco91_identity


def make_output(b=2, k=5, d=8, c=3, levels=((8, 10), (4, 5))) -> DetectorOutput:
    return DetectorOutput(
        queries=torch.randn(b, k, d),
        boxes=torch.rand(b, k, 4),
        logits=torch.randn(b, k, c),
        enc_maps={4: [torch.randn(b, d, h, w) for h, w in levels]},
        c1=torch.randn(b, 6, 16, 20),
        input_hw=torch.tensor([[64, 80]] * b),
        orig_hw=torch.tensor([[32, 40]] * b),
        level_valid_hw=torch.tensor([list(levels)] * b),
    )


def test_valid_output_passes_and_selects():
    out = make_output().validate()
    sub = out.select([1])
    assert sub.batch_size == 1 and sub.enc_maps[4][1].shape == (1, 8, 4, 5)
    assert out.scores.shape == (2, 5) and bool((out.scores <= 1).all())
    half = out.to("cpu", torch.float16)
    assert half.queries.dtype == torch.float16 and half.input_hw.dtype == torch.int64


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("boxes", torch.rand(2, 4, 4), "boxes must be"),
        ("input_hw", torch.ones(2, 2), "input_hw must be an integer"),
        ("level_valid_hw", torch.ones(2, 3, 2, dtype=torch.long), "level_valid_hw"),
        ("queries", torch.full((2, 5, 8), float("nan")), "non-finite"),
    ],
)
def test_broken_fields_are_named(field, value, msg):
    out = make_output()
    setattr(out, field, value)
    with pytest.raises(ValueError, match=msg):
        out.validate()


def test_preset_checks_class_map():
    pre = Preprocessing()
    DetectorPreset(
        name="x",
        family="dino",
        arch={},
        checkpoint_file=None,
        checkpoint_sha256=None,
        box_ap=None,
        num_classes=91,
        class_to_category=coco91_identity(),
        preprocessing=pre,
        level_strides=(8, 16, 32, 64),
        hidden_dim=256,
        c1_channels=256,
        num_encoder_layers=6,
    )
    with pytest.raises(ValueError, match="class_to_category"):
        DetectorPreset(
            name="x",
            family="dino",
            arch={},
            checkpoint_file=None,
            checkpoint_sha256=None,
            box_ap=None,
            num_classes=3,
            class_to_category=(0, 1),
            preprocessing=pre,
            level_strides=(8,),
            hidden_dim=8,
            c1_channels=8,
            num_encoder_layers=1,
        )
    assert Preprocessing.from_dict(pre.to_dict()) == pre
