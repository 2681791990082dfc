"""Presets that just work: shipped weights without --checkpoint, the encoder layer from the detector's
depth (cache, train, recipes), every recipe named after and sized for its preset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mfdetr.contracts import default_enc_layer
from mfdetr.detectors import get_preset
from mfdetr.detectors.defaults import shipped_weights
from mfdetr.engine.config import load_run_config, with_default_enc_layer
from tests.conftest import cli_output

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "pipeline" / "recipes").glob("*.toml"))


_cli = cli_output  # (exit status, output) of the in-process CLI


def test_default_encoder_layer_is_two_thirds_of_the_depth() -> None:
    assert [default_enc_layer(n) for n in (1, 2, 3, 4, 6, 9)] == [1, 1, 2, 3, 4, 6]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_is_named_after_and_sized_for_its_preset(recipe: Path) -> None:
    from mfdetr.config import from_dict
    from mfdetr.masknet import MaskNetConfig, build_masknet

    pre = get_preset(recipe.stem)  # named after a preset
    cfg = with_default_enc_layer(load_run_config(recipe), default_enc_layer(pre.num_encoder_layers))
    mcfg = from_dict(MaskNetConfig, cfg.masknet, where=recipe.name)
    assert 1 <= mcfg.enc_layer <= pre.num_encoder_layers, (recipe.name, mcfg.enc_layer)
    assert mcfg.num_queries <= pre.num_queries, (recipe.name, mcfg.num_queries, pre.num_queries)
    net = build_masknet(mcfg, d_model=pre.hidden_dim, level_strides=pre.level_strides, c1_channels=pre.c1_channels)
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    code, out = _cli("synth", "--out", root, "--train", "2", "--val", "2")
    assert code == 0, out
    return root


def test_cache_and_train_the_demo_preset_with_no_checkpoint_and_no_layer(synth: Path, tmp_path: Path) -> None:
    assert shipped_weights(get_preset("demo")) is not None
    store = tmp_path / "cache"
    code, out = _cli(
        "cache",
        "--detector",
        "demo",
        "--coco",
        synth,
        "--split",
        "val2017",
        "--out",
        store,
        "--workers",
        "0",
        "--no-progress",
    )
    assert code == 0, out
    manifest = json.loads((store / "zarr.json").read_text())["attributes"]["mfdetr_cache"]
    assert manifest["enc_layers"] == [2]  # layer 2 of the demo's 3
    shipped = shipped_weights(get_preset("demo"))
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    run = tmp_path / "run"
    code, out = _cli(
        "train",
        "--cache",
        store,
        "--config",
        REPO / "pipeline/recipes/demo.toml",
        "--out",
        run,
        "train.iterations=1",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.progress=false",
    )
    assert code == 0, out
    assert json.loads((run / "config.json").read_text())["masknet"]["enc_layer"] == 2
    code, out = _cli("train", "--cache", store, "--out", tmp_path / "run4", "masknet.enc_layer=3", "train.iterations=1")
    assert code != 0 and "masknet.enc_layer=3" in out  # an explicit layer is kept (and must be cached)


def test_released_preset_without_weights_needs_checkpoint(synth: Path, tmp_path: Path) -> None:
    code, out = _cli("cache", "--detector", "dino_r50", "--coco", synth, "--out", tmp_path / "c")
    assert code != 0 and "pass --checkpoint FILE" in out and "checkpoint0033_4scale.pth" in out
    code, out = _cli("cache", "--detector", "dino_tiny", "--coco", synth, "--out", tmp_path / "c")
    assert code != 0 and "has no released weights: pass --checkpoint FILE" in out
