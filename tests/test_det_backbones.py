"""ResNet (frozen BN) and tiny backbones on the Backbone contract; the backbone factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfdetr.detectors.backbones import (
    BackboneConfig,
    FrozenBatchNorm2d,
    ResNetBackbone,
    TinyConvBackbone,
    backbone_kinds,
    build_backbone,
)
from mfdetr.errors import MfdetrError


def test_frozen_bn_matches_batchnorm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=1e-5).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    fbn = FrozenBatchNorm2d(6)
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    fbn.load_state_dict(sd, strict=True)  # num_batches_tracked dropped on load
    assert sorted(fbn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(fbn(x), bn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("out_indices", [(1, 2, 3), (0, 1, 2, 3)])
def test_resnet_contract(out_indices):
    torch.manual_seed(0)
    bb = ResNetBackbone(depths=(1, 1, 1, 1), out_indices=out_indices).eval()
    assert [s.channels for s in bb.stage_specs] == [256, 512, 1024, 2048]
    assert [s.stride for s in bb.out_specs] == [4 * 2**i for i in out_indices]
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 70, 97))
    assert sorted(out) == sorted(set(out_indices) | {0})
    # ceil(H / stride) as torchvision's stride-2 convs give
    assert tuple(out[0].shape) == (1, 256, 18, 25) and tuple(out[3].shape) == (1, 2048, 3, 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert all(k.startswith(("conv1", "bn1", "layer")) for k in bb.body.state_dict())


def test_resnet50_keys_match_torchvision():
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.resnet50()
        ours = build_backbone(BackboneConfig(kind="resnet", params={"depths": (3, 4, 6, 3)}))
    tv_keys = {k for k in tv.state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(ours.body.state_dict()) == tv_keys


def test_tiny_backbone_and_factory():
    bb = build_backbone(BackboneConfig(kind="tiny", out_indices=(2, 3), params={"widths": (4, 8, 12, 16)}))
    assert isinstance(bb, TinyConvBackbone)
    out = bb(torch.randn(2, 3, 65, 33))
    assert sorted(out) == [0, 2, 3]
    assert tuple(out[0].shape) == (2, 4, 17, 9) and tuple(out[3].shape) == (2, 16, 3, 2)
    assert {"resnet", "tiny", "swin", "focalnet"} <= set(backbone_kinds())
    with pytest.raises(MfdetrError, match="unknown backbone kind"):
        build_backbone(BackboneConfig(kind="vgg"))
    with pytest.raises(MfdetrError, match="bad parameters"):
        build_backbone(BackboneConfig(kind="tiny", params={"width": 3}))
