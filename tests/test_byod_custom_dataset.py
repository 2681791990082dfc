"""A detector nobody hand-tuned for mfdetr, on a dataset that is not COCO: 7 categories with ids 11..17.

A tiny DINO trained by the project's own detector training and saved in the official DINO layout (with
``args``), the same trained in the detrex layout, and a tiny H-Deformable-DETR in the official H-DETR
layout each run ``mfdetr cache --detector auto`` → ``train`` → ``eval --per-category`` → ``predict``
through the command line, with no preset and no plugin; the predictions carry the dataset's category
ids and names. The class slots are matched to the categories three ways: slot = id (official DINO, 18
slots), sorted order (detrex, 7 slots) and a ``--categories`` list (H-DETR, 9 slots in a custom order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mfdetr.contracts import Preprocessing
from mfdetr.detectors.dino.presets import DINO_CONFIGS, dino_preset
from mfdetr.detectors.registry import register_detector, unregister_detector
from mfdetr.detectors.training import DataOptions, DetTrainConfig, OptimOptions
from mfdetr.engine.training.detector import train_detector
from tests._checkpoint_files import DETREX_CFG, DINO_ARGS, HDETR_ARGS, HDETR_TINY, to_detrex
from tests._tiny_detector import TINY_MASKNET
from tests.conftest import cli_output

IDS = tuple(range(11, 18))
NAMES = {11: "disc", 12: "box", 13: "triangle", 14: "arc", 15: "cross", 16: "star", 17: "disc-2"}
SMALL = Preprocessing(short_side=64, max_size=96)
RUN = (
    "train.iterations=2",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.device=cpu",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.progress=false",
    *TINY_MASKNET,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("byod") / "shapes"
    code, out = cli_output(
        "synth",
        "--out",
        root,
        "--train",
        "4",
        "--val",
        "2",
        "--image-size",
        "64",
        "--seed",
        "3",
        "--classes",
        "7",
        "--first-category-id",
        "11",
    )
    assert code == 0, out
    cats = json.loads((root / "annotations" / "instances_val2017.json").read_text())["categories"]
    assert {c["id"]: c["name"] for c in cats} == NAMES
    return root


def _train_dino(cfg, class_to_category: tuple[int, ...], data: Path, out: Path) -> dict[str, torch.Tensor]:
    """A few steps of the project's detector training on the 11..17 set; the trained state dict."""
    name = f"byod_train_{out.name}"
    preset = dataclasses.replace(
        dino_preset(name, cfg, None, None), class_to_category=class_to_category, preprocessing=SMALL
    )
    register_detector(preset, lambda **_: None)
    try:
        opts = OptimOptions(
            seed=0, batch_size=1, epochs=1, threads=1, log_every=1, checkpoint_every=100, eval_every_epochs=0
        )
        train_detector(
            DetTrainConfig(preset=name, data=DataOptions(root=str(data), val_split=""), train=opts),
            out,
            max_steps=2,
            log=lambda s: None,
        )
    finally:
        unregister_detector(name)
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _pipeline(data: Path, ckpt: Path, work: Path, *extra: str) -> dict:
    """cache (train, val) → train → eval --per-category → predict, all through the CLI; predictions.json."""
    for split in ("train2017", "val2017"):
        code, out = cli_output(
            "cache",
            "--detector",
            "auto",
            "--checkpoint",
            ckpt,
            "--coco",
            data,
            "--split",
            split,
            "--out",
            work / split,
            "--workers",
            "0",
            "--no-progress",
            "--topk",
            "10",
            *extra,
        )
        assert code == 0, out
    manifest = json.loads((work / "val2017" / "zarr.json").read_text())["attributes"]["mfdetr_cache"]
    code, out = cli_output("train", "--cache", work / "train2017", "--coco", data, "--out", work / "run", *RUN)
    assert code == 0, out
    code, out = cli_output(
        "eval", "--cache", work / "val2017", "--coco", data, "--checkpoint", work / "run" / "ckpt.pt", "--per-category"
    )
    assert code == 0, out
    table = out[out.index("    id category") :].splitlines()
    assert [int(r.split()[0]) for r in table[1:]] == list(IDS)  # one row per dataset category, by id
    assert [r.split()[1] for r in table[1:]] == [NAMES[i] for i in IDS] and "boundary" in table[0]
    code, out = cli_output(
        "predict",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--masknet",
        work / "run" / "ckpt.pt",
        data / "val2017",
        "--out",
        work / "preds",
        "--no-overlays",
        "--no-progress",
        "--score-threshold",
        "0",
        *extra,
    )
    assert code == 0, out
    pred = json.loads((work / "preds" / "predictions.json").read_text())
    assert pred["annotations"], "no predictions"
    return {"manifest": manifest, "pred": pred}


def _check_names(pred: dict, names: dict[int, str]) -> None:
    for a in pred["annotations"]:
        assert a["category_id"] in names and a["category_name"] == names[a["category_id"]], a
    assert {c["id"]: c["name"] for c in pred["categories"]} == names


def test_official_dino_trained_here(data: Path, tmp_path: Path) -> None:
    """18 slots, slot = category id (the official DINO convention): slots 0..10 predict no category."""
    cfg = dataclasses.replace(DINO_CONFIGS["dino_tiny"][0], num_classes=18, dn_labelbook_size=18)
    sd = _train_dino(cfg, tuple(range(18)), data, tmp_path / "dino")
    args = {**DINO_ARGS, "num_classes": 18, "data_aug_scales": [64], "data_aug_max_size": 96}
    ckpt = tmp_path / "checkpoint0011.pth"
    torch.save({"model": sd, "args": argparse.Namespace(**args), "epoch": 11}, ckpt)
    got = _pipeline(data, ckpt, tmp_path)
    det = got["manifest"]["detector"]
    assert got["manifest"]["category_map"] == [0] * 11 + list(IDS) and det["name"] == "auto-checkpoint0011"
    assert det["preprocessing"]["short_side"] == 64 and det["preprocessing"]["max_size"] == 96
    _check_names(got["pred"], NAMES)  # from the training annotation file the MaskNet run records


def test_detrex_dino_trained_here(data: Path, tmp_path: Path) -> None:
    """7 slots in the dataset's sorted id order (detrex; the eval resize from a config file); names on bare
    images from --categories."""
    sd = _train_dino(DETREX_CFG, IDS, data, tmp_path / "dino")
    sd = {to_detrex(k): v for k, v in sd.items()}
    n = DETREX_CFG.dec_layers
    sd.update(
        {
            f"transformer.decoder.{k}": v
            for k, v in list(sd.items())
            if k.startswith((f"class_embed.{n}.", f"bbox_embed.{n}."))
        }
    )
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 2}, ckpt)
    config = tmp_path / "dino_r50_4scale.py"  # detrex states no args: the eval resize it was trained with
    config.write_text("data_aug_scales = [64]\ndata_aug_max_size = 96\n")
    got = _pipeline(data, ckpt, tmp_path, "--detector-config", config)
    assert got["manifest"]["category_map"] == list(IDS)
    _check_names(got["pred"], NAMES)
    names = tmp_path / "names.json"
    names.write_text(json.dumps([{"id": i, "name": f"shape {i}"} for i in IDS]))
    code, out = cli_output(
        "predict",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--masknet",
        tmp_path / "run" / "ckpt.pt",
        data / "val2017",
        "--out",
        tmp_path / "named",
        "--no-overlays",
        "--no-progress",
        "--score-threshold",
        "0",
        "--categories",
        names,
        "--detector-config",
        config,
    )
    assert code == 0, out
    _check_names(json.loads((tmp_path / "named" / "predictions.json").read_text()), {i: f"shape {i}" for i in IDS})


def test_hdetr_with_a_categories_list(data: Path, tmp_path: Path) -> None:
    """9 slots that match the 7 categories neither by id nor by count: --categories names them in slot
    order; without it, or with a list that leaves a dataset category out, a one-line error."""
    from mfdetr.detectors.common.arch import family_preset
    from mfdetr.detectors.hdetr.model import build_hdetr_model

    cfg = dataclasses.replace(HDETR_TINY, num_classes=9)
    torch.manual_seed(0)
    model = build_hdetr_model(cfg, preset=family_preset("t", "hdetr", cfg, checkpoint_file=None, box_ap=None))
    ckpt = tmp_path / "hdetr_r50.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(**HDETR_ARGS, num_classes=9)}, ckpt)
    order = [40, 17, 11, 12, 13, 14, 15, 16, 41]
    names = {**NAMES, 40: "kite", 41: "lamp"}
    listed = tmp_path / "slots.json"
    listed.write_text(json.dumps([{"id": i, "name": names[i]} for i in order]))
    code, out = cli_output("cache", "--detector", "auto", "--checkpoint", ckpt, "--coco", data, "--out", tmp_path / "x")
    assert code != 0 and "has 9 class slots" in out and "--categories" in out and "instances_val2017.json" in out
    assert len(out.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"id": i, "name": names.get(i, "mug")} for i in order[:2] + [42] + order[3:]]))
    code, out = cli_output(
        "cache",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--coco",
        data,
        "--out",
        tmp_path / "x",
        "--categories",
        short,
    )
    assert code != 0 and str(short) in out and "[11]" in out and len(out.strip().splitlines()) == 1, out
    got = _pipeline(data, ckpt, tmp_path, "--categories", listed)
    assert got["manifest"]["category_map"] == order
    _check_names(got["pred"], names)
