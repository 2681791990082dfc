"""``mfdetr describe``: #params▲ / #FLOPs▲ per component (the CLI in-process, tiny explicit detector features)."""

from __future__ import annotations

import re

from tests.conftest import assert_user_error, cli


def test_describe_tiny_explicit_features(tmp_path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[masknet]\nroi_size = 8\nbox_encoder.dim = 16\nmask_scoring.channels = 8\n"
        "mask_scoring.fc_dim = 8\nneck.groups = 8\n"
    )
    proc = cli(
        "describe",
        "--config",
        recipe,
        "--d",
        "32",
        "--levels",
        "8/16",
        "--c1-channels",
        "24",
        "--input-size",
        "40x56",
        "-k",
        "4",
        "masknet.image_encoder.layers=1",
        check=True,
    )
    out = proc.stdout
    assert "features: explicit values" in out and "input 40x56, K=4, S=8" in out
    rows = {
        m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)), float(m.group(4)))
        for m in re.finditer(r"^(\w+)\s+([\d,]+)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    }
    assert set(rows) >= {"neck", "image_encoder", "box_encoder", "query_encoder", "mask_head", "mask_scoring", "total"}
    assert rows["neck"][0] == 24 * 32 + 32 + 64
    assert rows["total"][0] == sum(v[0] for k, v in rows.items() if k != "total")
    assert rows["total"][1] > 0 and abs(rows["total"][2] - rows["total"][1] / 2) < 0.011  # GMACs = GFLOPs / 2
    assert "FlopCounterMode" in out and "GMACs" in out


def test_describe_unknown_detector_is_one_line_error() -> None:
    assert_user_error(cli("describe", "--detector", "no_such_detector", "--no-flops"), "no_such_detector")


def test_flops_land_in_each_component_and_the_model_is_left_as_it_was() -> None:
    """Every part's matmuls are counted under its own name (the image encoder's included), nothing is
    left over, and counting leaves the model's training mode, gradients and folding as they were."""
    from _masknet_models import build, make_det, tiny_cfg
    from mfdetr.masknet.complexity import COMPONENTS, flops_by_component

    model = build(tiny_cfg(["image_encoder.layers=1"])).train()
    flops = flops_by_component(model, make_det(b=1, k=4))
    assert all(flops[name] > 0 for name in COMPONENTS), flops
    assert flops["other"] == 0 and flops["total"] == sum(flops[name] for name in COMPONENTS)
    assert model.training and model.fold_linear_maps and all(p.requires_grad for p in model.parameters())
