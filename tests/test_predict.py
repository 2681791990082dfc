"""``mfdetr predict``: frozen detector (``dino_tiny`` code, random weights, 64-px preprocessing) →
random tiny MaskNet → COCO JSON + overlay PNGs; bad inputs skipped; checkpoint errors on one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_user_error, cli
from tests._tiny_detector import NAME, PLUGIN, save_detector_checkpoint, tiny_masknet_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mfdetr.config import to_dict
    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.detectors import get_preset
    from mfdetr.masknet import build_masknet

    root = tmp_path_factory.mktemp("predict")
    generate_synth(root / "synth", config=SynthConfig(train=0, val=3, image_size=40, seed=3))
    det = save_detector_checkpoint(root / "det.pth")
    preset = get_preset(NAME)
    cfg = tiny_masknet_config()
    torch.manual_seed(1)
    model = build_masknet(
        cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
    )
    plain = root / "masknet_plain.pt"
    torch.save(
        {
            "masknet_config": to_dict(cfg),
            "model": model.state_dict(),
            "detector": NAME,
            "class_to_category": list(preset.class_to_category),
            "categories": [{"id": 1, "name": "thing one"}],
            "enc_layer": cfg.enc_layer,
        },
        plain,
    )
    # the engine's run checkpoint layout (mfdetr.engine.trainer): identity of the cache under meta.detector
    ident = {
        "detector.name": NAME,
        "checkpoint.sha256": None,
        "hidden_dim": preset.hidden_dim,
        "level_strides": list(preset.level_strides),
        "c1_channels": preset.c1_channels,
        "num_classes": preset.num_classes,
        "category_map": list(preset.class_to_category),
    }
    engine = root / "ckpt.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "step": 5,
            "config": {},
            "masknet_config": to_dict(cfg),
            "meta": {"detector": ident},
        },
        engine,
    )
    wrong = root / "wrong_d.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "step": 5,
            "masknet_config": to_dict(cfg),
            "meta": {"detector": {**ident, "hidden_dim": 64}},
        },
        wrong,
    )
    bad = root / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG")
    return {
        "root": root,
        "images": root / "synth" / "val2017",
        "det": det,
        "plain": plain,
        "engine": engine,
        "wrong": wrong,
        "bad": bad,
    }


def _job(s: dict[str, Path], out: Path, **kw: Any) -> Any:
    from mfdetr.engine.inference.predict import PredictJob

    args = dict(
        detector=NAME,
        masknet=s["plain"],
        inputs=(str(s["images"]), str(s["bad"])),
        out=out,
        checkpoint=s["det"],
        score_threshold=0.0,
        device="cpu",
    )
    args.update(kw)
    return PredictJob(**args)


def test_predict_cli_json_overlays_and_skips(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pycocotools.coco import COCO

    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    out = tmp_path / "out"
    proc = cli(
        "predict",
        "--detector",
        NAME,
        "--checkpoint",
        setup["det"],
        "--masknet",
        setup["engine"],
        setup["images"],
        setup["bad"],
        setup["root"] / "nope.png",
        "--out",
        out,
        "--score-threshold",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped" in proc.stderr and "bad.jpg" in proc.stderr and "nope.png" in proc.stderr
    pred = json.loads((out / "predictions.json").read_text())
    files = sorted(setup["images"].iterdir())
    assert [Path(i["file_name"]).name for i in pred["images"]] == [f.name for f in files]
    assert {Path(s["file_name"]).name for s in pred["skipped"]} == {"bad.jpg", "nope.png"}
    assert all(s["reason"] for s in pred["skipped"])
    sizes = {i["id"]: (i["height"], i["width"]) for i in pred["images"]}
    for f, im in zip(files, pred["images"], strict=True):
        with Image.open(f) as pic:
            assert (pic.height, pic.width) == (im["height"], im["width"])
    anns = pred["annotations"]
    assert 0 < len(anns) <= 3 * 10  # K = 10 queries per image, minus those of unused class slots
    names = {c["id"]: c["name"] for c in pred["categories"]}
    assert names[1] == "person" and names[90] == "toothbrush"  # dino_tiny: COCO's 91 slots
    for a in anns:
        assert a["segmentation"]["size"] == list(sizes[a["image_id"]])
        assert isinstance(a["segmentation"]["counts"], str) and len(a["bbox"]) == 4
        assert 0.0 <= a["score"] <= 1.0 and a["category_name"] == names[a["category_id"]]
    # results.json loads into pycocotools against a GT made of the same images
    gt = COCO()
    gt.dataset = {
        "images": pred["images"],
        "annotations": [],
        "categories": pred["categories"]
        + [{"id": a["category_id"], "name": a["category_name"]} for a in anns if a["category_id"] not in names],
    }
    gt.createIndex()
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(anns)
    dt = gt.loadRes(results)
    for ann in dt.dataset["annotations"]:
        assert dt.annToMask(ann).shape == sizes[ann["image_id"]]
    # one overlay per readable image, at the original size, with something drawn on it
    for f in files:
        png = out / "overlays" / f"{f.stem}.png"
        with Image.open(png) as o, Image.open(f) as src:
            assert o.size == src.size
            assert not np.array_equal(np.asarray(o.convert("RGB")), np.asarray(src.convert("RGB")))
    assert len(list((out / "overlays").iterdir())) == len(files)


def test_predict_matches_detector_then_masknet(setup: dict[str, Path], tmp_path: Path) -> None:
    """The JSON holds exactly what the composed library calls give, thresholded."""
    from mfdetr.data import EvalTransform, load_rgb
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.contracts import ImageBatch
    from mfdetr.engine.inference.predict import load_masknet_checkpoint, run_predict
    from mfdetr.masknet import masks_to_coco_results

    preset = get_preset(NAME)
    det = build_detector(NAME, checkpoint=setup["det"])
    mn = load_masknet_checkpoint(setup["plain"], preset=preset)
    want = []
    for i, f in enumerate(sorted(setup["images"].iterdir()), start=1):
        img = load_rgb(f)
        x = EvalTransform(preprocessing=preset.preprocessing)(img)
        b = ImageBatch(
            images=x[None],
            pad_mask=torch.zeros(1, *x.shape[1:], dtype=torch.bool),
            input_hw=torch.tensor([x.shape[1:]]),
            orig_hw=torch.tensor([[img.height, img.width]]),
            image_ids=[i],
            file_names=[str(f)],
        )
        with torch.inference_mode():
            o = det.detect(b, topk=10, enc_layers=(4,))
            want += masks_to_coco_results(
                mn.model(o), o, preset.class_to_category, [i], score="mask_iou", min_score=0.0
            )
    t = float(np.median([w["score"] for w in want]))  # a threshold that keeps about half
    want = [w for w in want if w["score"] >= t]
    s = run_predict(
        _job(setup, tmp_path / "o", score_threshold=t, overlays=False),
        progress=False,
        echo=lambda _: None,
        warn=lambda _: None,
    )
    assert s.images == 3 and len(s.skipped) == 1 and s.overlays == []
    got = json.loads(s.results_json.read_text())
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert (g["image_id"], g["category_id"], g["segmentation"]) == (
            w["image_id"],
            w["category_id"],
            w["segmentation"],
        )
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=1e-3)
    assert all(g["score"] >= t for g in got)


def test_threshold_one_keeps_nothing_and_overlay_is_the_image(setup: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.engine.inference.predict import run_predict

    s = run_predict(
        _job(setup, tmp_path / "o", score_threshold=1.0, masknet=setup["engine"]),
        progress=False,
        echo=lambda _: None,
        warn=lambda _: None,
    )
    pred = json.loads(s.predictions_json.read_text())
    assert pred["annotations"] == [] and len(pred["images"]) == 3
    for f in sorted(setup["images"].iterdir()):
        with Image.open(tmp_path / "o" / "overlays" / f"{f.stem}.png") as o, Image.open(f) as src:
            assert np.array_equal(np.asarray(o.convert("RGB")), np.asarray(src.convert("RGB")))


def test_checkpoint_records_category_names(setup: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.engine.inference.predict import run_predict

    s = run_predict(
        _job(setup, tmp_path / "o", overlays=False), progress=False, echo=lambda _: None, warn=lambda _: None
    )
    cats = {c["id"]: c["name"] for c in json.loads(s.predictions_json.read_text())["categories"]}
    assert cats[1] == "thing one" and cats[2] == "bicycle"


def test_overlay_draws_mask_box_and_label() -> None:
    from mfdetr.engine.inference.overlay import OverlayInstance, category_color, draw_overlay

    img = Image.new("RGB", (60, 40), (0, 0, 0))
    mask = np.zeros((40, 60), dtype=bool)
    mask[20:30, 30:50] = True
    out = np.asarray(
        draw_overlay(
            img,
            [OverlayInstance(mask=mask, box_xywh=(28.0, 18.0, 24.0, 14.0), label="disc", score=0.9, category_id=3)],
            alpha=0.5,
        )
    )
    color = np.array(category_color(3))
    assert np.allclose(out[25, 40], np.round(color * 0.5), atol=1)  # inside: translucent colour
    assert np.array_equal(out[20, 40], color)  # mask outline: solid colour
    assert np.array_equal(out[5, 2], [0, 0, 0])  # far away: untouched
    assert np.array_equal(out[31, 28], color)  # box outline (left edge)
    assert np.abs(out[:18].astype(int) - 0).sum() > 0  # the label tag above the box


def test_missing_and_foreign_checkpoints_are_one_line_errors(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    base = [
        "predict",
        "--detector",
        NAME,
        "--checkpoint",
        setup["det"],
        setup["images"],
        "--out",
        tmp_path / "o",
        "--device",
        "cpu",
    ]
    assert_user_error(cli(*base, "--masknet", tmp_path / "nothing.pt"), "MaskNet checkpoint not found", "nothing.pt")
    from mfdetr.engine.inference.predict import run_predict
    from mfdetr.errors import MfdetrError

    with pytest.raises(MfdetrError, match="hidden_dim=64"):
        run_predict(_job(setup, tmp_path / "o", masknet=setup["wrong"]), progress=False, echo=lambda _: None)
    with pytest.raises(MfdetrError, match="trained on the outputs of detector 'dino_tiny64', not 'dino_tiny'"):
        run_predict(_job(setup, tmp_path / "o", detector="dino_tiny"), progress=False, echo=lambda _: None)
    with pytest.raises(MfdetrError, match="detector checkpoint file not found"):
        run_predict(_job(setup, tmp_path / "o", checkpoint=tmp_path / "no.pth"), progress=False, echo=lambda _: None)
    with pytest.raises(MfdetrError, match="no image files"):
        run_predict(
            _job(setup, tmp_path / "o", inputs=(str(setup["bad"].parent / "x.png"),)),
            progress=False,
            echo=lambda _: None,
            warn=lambda _: None,
        )


def test_other_detector_checkpoint_warns(setup: dict[str, Path], tmp_path: Path) -> None:
    """A MaskNet trained on another checkpoint of the same preset (sha256 differs) runs, with a warning."""
    from mfdetr.engine.inference.predict import run_predict

    ckpt = torch.load(setup["engine"], weights_only=False)
    ckpt["meta"]["detector"]["checkpoint.sha256"] = "0" * 64
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    warnings: list[str] = []
    s = run_predict(
        _job(setup, tmp_path / "o", masknet=other, overlays=False),
        progress=False,
        echo=lambda _: None,
        warn=warnings.append,
    )
    assert s.images == 3
    assert any("another checkpoint" in w and "000000000000" in w for w in warnings), warnings
