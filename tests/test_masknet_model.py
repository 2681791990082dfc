"""MaskNet on tiny random DetectorOutputs: every configuration of Tables 1-5, 10, 12, 14 builds, runs
forward and backward with finite outputs and gives every parameter a gradient; outputs do not depend
on the padding of the maps; top-K selection; batch of one vs many; config errors."""

from __future__ import annotations


import pytest
import torch

from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError
from mfdetr.masknet import MaskNet, MaskNetOutput, baseline_config
from mfdetr.masknet.complexity import PAPER_ROWS
from mfdetr.masknet.config import load_masknet_config
from tests._masknet_models import D_MODEL, build, make_det, tiny_cfg


def check_forward_backward(model: MaskNet, det: DetectorOutput) -> MaskNetOutput:
    # Deformable DETR zero-initialises the offset/attention-weight projections, which makes the gradient
    # of the positional/level embeddings exactly zero at step 0: perturb the weights as training would
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = model(det)
    assert torch.isfinite(out.mask_logits).all()
    loss = out.mask_logits.float().square().mean()
    if out.iou_pred is not None:
        assert torch.isfinite(out.iou_pred).all() and (out.iou_pred >= 0).all() and (out.iou_pred <= 1).all()
        loss = loss + out.iou_pred.sum()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params:
        loss.backward()
        no_grad = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not no_grad, no_grad
        zero = [n for n, p in params if not p.grad.abs().sum() > 0]
        assert not zero, zero
    return out


ROWS = [*PAPER_ROWS, *[("Table 10", f"S={s}", (f"roi_size={s}",), None, None) for s in (16, 32, 64)]]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_paper_configurations_forward_backward(row: tuple) -> None:
    table, _, ovs, paper_m, _ = row
    cfg = tiny_cfg(ovs)
    model = build(cfg)
    det = make_det(b=2, k=6)
    out = check_forward_backward(model, det)
    k = min(cfg.num_queries, 6)
    s = cfg.roi_size
    if cfg.roi:
        assert out.roi and tuple(out.mask_logits.shape) == (2, k, s, s)
    else:
        assert not out.roi and tuple(out.mask_logits.shape) == (2, k, 11, 15)
        assert out.mask_valid_hw.tolist() == [[11, 15], [11, 15]]
    assert (out.iou_pred is not None) == cfg.mask_scoring.enabled
    if paper_m == 0.0:  # the training-free baseline has no parameters at all
        assert sum(p.numel() for p in model.parameters()) == 0
    assert torch.equal(out.scores, det.scores[:, :k]) and torch.equal(out.boxes, det.boxes[:, :k].float())


PADDING_CONFIGS = {
    "default": [],
    "swin": ["image_encoder.block=swin", "box_encoder.block=swin", "box_encoder.heads=4"],
    "convnext+segmenter": [
        "image_encoder.block=convnext",
        "box_encoder.block=convnext",
        "mask_head.kind=segmenter",
        "query_encoder.o2o=true",
    ],
    "baseline non-RoI": [*PAPER_ROWS[2][2]],
    "baseline RoI, no C1": [*PAPER_ROWS[1][2]],
}


@pytest.mark.parametrize("name", list(PADDING_CONFIGS))
def test_padding_invariance(name: str) -> None:
    """Same image, different canvas padding (filled with garbage) → same outputs."""
    model = build(tiny_cfg(PADDING_CONFIGS[name])).eval()
    ref = make_det(b=1, k=5, hw=(45, 61))
    base = {
        "queries": ref.queries,
        "boxes": ref.boxes,
        "logits": ref.logits,
        "maps": [m for m in ref.enc_maps[4]],
        "c1": ref.c1,
    }
    with torch.no_grad():
        o0 = model(ref)
        for pad in ((19, 0), (3, 37), (40, 40)):
            o = model(
                make_det(
                    b=1,
                    k=5,
                    hw=(45, 61),
                    pad=pad,
                    base=base,
                    seed=1 + pad[0],
                    map_fill=float("nan") if pad[0] == 40 else None,
                )
            )
            h, w = o0.mask_logits.shape[-2:]
            if o0.roi:
                assert o.mask_logits.shape == o0.mask_logits.shape
            torch.testing.assert_close(o.mask_logits[..., :h, :w], o0.mask_logits, atol=2e-4, rtol=1e-4)
            if o0.iou_pred is not None:
                torch.testing.assert_close(o.iou_pred, o0.iou_pred, atol=1e-5, rtol=1e-5)


def test_batch_of_one_equals_batch_of_many() -> None:
    model = build(tiny_cfg(["query_encoder.o2o=true"])).eval()
    det = make_det(b=3, k=5)
    with torch.no_grad():
        full = model(det)
        for i in range(3):
            one = model(det.select([i]))
            torch.testing.assert_close(one.mask_logits[0], full.mask_logits[i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(one.iou_pred[0], full.iou_pred[i], atol=1e-5, rtol=1e-5)


def test_num_queries_takes_top_k() -> None:
    """K=3 of 6 stored: the first 3 queries (score order); without O2O they are segmented as before."""
    det = make_det(b=2, k=6)
    model6 = build(tiny_cfg()).eval()
    model3 = build(tiny_cfg(["num_queries=3"])).eval()
    model3.load_state_dict(model6.state_dict())
    with torch.no_grad():
        o6, o3 = model6(det), model3(det)
    assert o3.mask_logits.shape[1] == 3 and o3.logits.shape[1] == 3
    torch.testing.assert_close(o3.mask_logits, o6.mask_logits[:, :3])
    torch.testing.assert_close(o3.iou_pred, o6.iou_pred[:, :3])


def test_default_config_at_s32_and_neck_from_other_c1_width() -> None:
    cfg = tiny_cfg(["roi_size=32"])
    model = build(cfg, c1_channels=24)
    out = check_forward_backward(model, make_det(b=1, k=3, c1_channels=24))
    assert tuple(out.mask_logits.shape) == (1, 3, 32, 32)


def test_autocast_runs_finite() -> None:
    model = build(tiny_cfg(["image_encoder.block=swin", "query_encoder.o2o=true"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_det(b=1, k=4))
    assert torch.isfinite(out.mask_logits.float()).all() and torch.isfinite(out.iou_pred.float()).all()


def test_fp16_cache_inputs_are_accepted() -> None:
    det = make_det(b=1, k=4)
    half = DetectorOutput(
        queries=det.queries.half(),
        boxes=det.boxes.half(),
        logits=det.logits.half(),
        enc_maps={4: [m.half() for m in det.enc_maps[4]]},
        c1=det.c1.half(),
        input_hw=det.input_hw,
        orig_hw=det.orig_hw,
        level_valid_hw=det.level_valid_hw,
    )
    model = build(tiny_cfg()).eval()
    with torch.no_grad():
        a, b = model(det), model(half)
    assert a.mask_logits.dtype == torch.float32
    torch.testing.assert_close(b.mask_logits, a.mask_logits, atol=0.2, rtol=0.05)


@pytest.mark.parametrize(
    ("overrides", "c1", "needle"),
    [
        (["neck.enabled=false"], 24, "C1's channels (24) must equal d (32)"),
        (["roi=false"], D_MODEL, "roi=false"),
        (["neck.enabled=true", "fuse_c1=false"], D_MODEL, "fuse_c1"),
        (["box_encoder.dim=20", "box_encoder.heads=8"], D_MODEL, "box_encoder.heads=8 must divide"),
        (["image_encoder.layers=-1"], D_MODEL, "image_encoder.layers"),
    ],
)
def test_config_errors(overrides: list[str], c1: int, needle: str) -> None:
    with pytest.raises(MfdetrError, match="masknet config") as e:
        build(tiny_cfg(overrides), c1_channels=c1)
    assert needle in str(e.value)


def test_input_mismatch_errors() -> None:
    model = build(tiny_cfg(["enc_layer=3"]))
    with pytest.raises(MfdetrError, match=r"enc_layer=3 .* layers \[4\]"):
        model(make_det(b=1, k=2))
    with pytest.raises(MfdetrError, match="C1 with 32 channels"):
        build(tiny_cfg())(make_det(b=1, k=2, c1_channels=24))


def test_baseline_config_and_recipe_loading(tmp_path) -> None:
    assert sum(p.numel() for p in build(baseline_config(roi_size=8)).parameters()) == 0
    recipe = tmp_path / "r.toml"
    recipe.write_text('[masknet]\nroi_size = 16\nbox_encoder.block = "swin"\n[loss]\npoint_sampling = true\n')
    cfg = load_masknet_config(recipe, ["masknet.image_encoder.layers=3", "query_encoder.o2o=true"])
    got = (cfg.roi_size, cfg.box_encoder.block, cfg.image_encoder.layers, cfg.query_encoder.o2o)
    assert got == (16, "swin", 3, True)
    with pytest.raises(MfdetrError, match="unknown key"):
        load_masknet_config(recipe, ["masknet.box_encoder.depth=3"])
    with pytest.raises(MfdetrError, match="is not one of"):
        load_masknet_config(None, ["masknet.mask_head.kind=conv"])


def test_masknet_never_imports_detectors(fresh_imports: dict[str, list[str]]) -> None:
    """The mask network only ever sees tensors (stage 2 never imports mfdetr.detectors)."""
    bad = [m for m in fresh_imports["masknet"] if m.startswith("mfdetr.detectors")]
    assert not bad, bad
