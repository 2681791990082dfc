"""Encoder block registry: a new block kind is one class plus one registration, the config accepts
exactly the registered names, and both encoders run any registered kind without per-kind code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mfdetr.config import apply_overrides, from_dict, to_dict
from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError
from mfdetr.masknet import MaskNetConfig, build_masknet, load_masknet_config
from mfdetr.masknet.blocks import BlockArgs, FirstLevelBlock, block_names, get_block, register_block, registry

D, STRIDES = 16, (8, 16, 32)


class Pointwise(nn.Module):
    """A residual per-pixel Linear on [B, C, H, W]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PointwiseBlocks(FirstLevelBlock):
    """A tiny block kind for the test: pointwise residual layers on E_1 and on the RoI maps."""

    def build_image(self, count: int, args: BlockArgs, *, levels: int):
        return [Pointwise(args.dim) for _ in range(count)], None

    def build_box(self, count: int, args: BlockArgs, *, roi_size: int):
        return [Pointwise(args.dim) for _ in range(count)], nn.Parameter(torch.zeros(args.dim))

    def encode_map(self, layers: nn.ModuleList, x: Tensor, valid_hw: Tensor) -> Tensor:
        for layer in layers:
            x = layer(x)
        return x

    def encode_rois(self, layers: nn.ModuleList, rois: Tensor, embed: Tensor | None) -> Tensor:
        x = rois if embed is None else rois + embed[None, :, None, None]
        for layer in layers:
            x = layer(x)
        return x.flatten(2).transpose(1, 2)


@pytest.fixture
def own_registry(monkeypatch):
    """A private copy of the registry, so the test's kind does not outlive the test."""
    monkeypatch.setattr(registry, "_BLOCKS", dict(registry._BLOCKS))


def tiny_det(b: int = 2, k: int = 4, hw: tuple[int, int] = (40, 52)) -> DetectorOutput:
    g = torch.Generator().manual_seed(0)
    h, w = hw
    boxes = torch.cat((torch.rand(b, k, 2, generator=g) * 0.5 + 0.25, torch.rand(b, k, 2, generator=g) * 0.3 + 0.1), -1)
    return DetectorOutput(
        queries=torch.randn(b, k, D, generator=g),
        boxes=boxes,
        logits=torch.randn(b, k, 5, generator=g),
        enc_maps={4: [torch.randn(b, D, math.ceil(h / s), math.ceil(w / s), generator=g) for s in STRIDES]},
        c1=torch.randn(b, D, math.ceil(h / 4), math.ceil(w / 4), generator=g),
        input_hw=torch.tensor([[h, w]] * b),
        orig_hw=torch.tensor([[h, w]] * b),
        level_valid_hw=torch.tensor([[[math.ceil(h / s), math.ceil(w / s)] for s in STRIDES]] * b),
    ).validate()


def tiny_cfg(overrides: list[str]) -> MaskNetConfig:
    base = [
        "roi_size=4",
        "box_encoder.dim=8",
        "mask_scoring.channels=8",
        "mask_scoring.fc_dim=8",
        "neck.groups=4",
        "image_encoder.heads=2",
        "box_encoder.heads=2",
        "query_encoder.heads=2",
    ]
    return from_dict(MaskNetConfig, apply_overrides(to_dict(MaskNetConfig()), [*base, *overrides]))


def test_builtin_kinds_are_registered() -> None:
    assert set(block_names()) >= {"deformable", "swin", "convnext"}
    with pytest.raises(ValueError, match="is not one of"):
        get_block("transformer-xl")


def test_config_accepts_exactly_the_registered_kinds(own_registry) -> None:
    with pytest.raises(MfdetrError, match=r"image_encoder.*'pointwise' is not one of \['convnext', 'deformable'"):
        load_masknet_config(None, ["image_encoder.block=pointwise"])
    register_block("pointwise")(PointwiseBlocks)
    cfg = load_masknet_config(None, ["image_encoder.block=pointwise", "box_encoder.block=pointwise"])
    assert (cfg.image_encoder.block, cfg.box_encoder.block) == ("pointwise", "pointwise")
    with pytest.raises(ValueError, match="already registered"):
        register_block("pointwise")(PointwiseBlocks)


def test_a_new_kind_builds_and_trains_through_the_config(own_registry) -> None:
    register_block("pointwise")(PointwiseBlocks)
    torch.manual_seed(0)
    cfg = tiny_cfg(
        [
            "image_encoder.block=pointwise",
            "image_encoder.layers=2",
            "box_encoder.block=pointwise",
            "box_encoder.layers=3",
        ]
    )
    model = build_masknet(cfg, d_model=D, level_strides=STRIDES, c1_channels=D)
    names = dict(model.named_parameters())
    assert {"image_encoder.layers.1.proj.weight", "box_encoder.layers.2.proj.bias", "box_encoder.pos_embed"} <= set(
        names
    )
    assert "image_encoder.level_embed" not in names
    assert names["image_encoder.layers.0.proj.weight"].shape == (D, D)
    assert names["box_encoder.layers.0.proj.weight"].shape == (8, 8)
    det = tiny_det()
    out = model(det)
    assert out.mask_logits.shape == (2, 4, 4, 4) and torch.isfinite(out.mask_logits).all()
    out.mask_logits.square().mean().backward()
    for n in ("image_encoder.layers.0.proj.weight", "box_encoder.layers.0.proj.weight", "box_encoder.pos_embed"):
        assert names[n].grad is not None and names[n].grad.abs().sum() > 0, n
    # the new kind really runs: zeroing its layers' projections changes the masks
    with torch.no_grad():
        before = model(det).mask_logits
        for layer in model.box_encoder.layers:
            layer.proj.weight.zero_()
        assert not torch.allclose(model(det).mask_logits, before)


@pytest.mark.parametrize("block", ["deformable", "swin", "convnext"])
def test_image_encoder_first_level_equals_forward_for_every_kind(block: str) -> None:
    """The encoders hold no per-kind code: ``first_level`` is E_1 of ``forward`` for every kind."""
    from mfdetr.masknet.image_encoder import build_image_encoder

    torch.manual_seed(0)
    enc = build_image_encoder(block=block, layers=2, dim=D, levels=3, heads=2, points=2, swin_window=4).double()
    for p in enc.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    valid = torch.tensor([[[10, 13], [5, 7], [3, 4]], [[7, 9], [4, 5], [2, 3]]])
    maps = [torch.randn(2, D, h, w, dtype=torch.float64) for h, w in ((10, 13), (5, 7), (3, 4))]
    for lvl, m in enumerate(maps):
        for b in range(2):
            m[b, :, valid[b, lvl, 0] :] = 0
            m[b, :, :, valid[b, lvl, 1] :] = 0
    full = enc(maps, valid)
    assert [tuple(f.shape) for f in full] == [tuple(m.shape) for m in maps]
    torch.testing.assert_close(enc.first_level(maps, valid), full[0], rtol=1e-12, atol=1e-12)
    assert (full[0][1, :, 7:] == 0).all() and (full[0][1, :, :, 9:] == 0).all()
