"""Hostile images through predict, online training and detector training: every extreme or huge-header
image ends processed, recorded as skipped or replaced by the next image, never a traceback; a crash
in predict leaves no stale result behind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests._hostile_data import EXTREMES, HUGE, extreme_coco, no_traceback, png_header_only
from tests.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2


# ---- predict ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mfdetr.config import to_dict
    from mfdetr.detectors import get_preset
    from mfdetr.masknet import build_masknet
    from tests._tiny_detector import NAME, save_detector_checkpoint, tiny_masknet_config

    root = tmp_path_factory.mktemp("hostile_predict")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for stem, (h, w) in {"normal": (40, 48), **EXTREMES}.items():
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    for stem, (h, w) in HUGE.items():
        png_header_only(images / f"{stem}.png", h, w)
    preset = get_preset(NAME)
    cfg = tiny_masknet_config()
    torch.manual_seed(1)
    model = build_masknet(
        cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
    )
    masknet = root / "masknet.pt"
    torch.save({"masknet_config": to_dict(cfg), "model": model.state_dict(), "detector": NAME}, masknet)
    return {"root": root, "images": images, "det": save_detector_checkpoint(root / "det.pth"), "masknet": masknet}


def _predict_args(s: dict[str, Path], out: Path) -> list[Any]:
    from tests._tiny_detector import NAME

    return [
        "predict",
        s["images"],
        "--detector",
        NAME,
        "--checkpoint",
        s["det"],
        "--masknet",
        s["masknet"],
        "--out",
        out,
        "--score-threshold",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-overlays",
    ]


def test_predict_processes_or_records_every_extreme_image(
    predict_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._tiny_detector import PLUGIN

    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    out = tmp_path / "out"
    proc = cli(*_predict_args(predict_setup, out))
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    pred = json.loads((out / "predictions.json").read_text())
    done = {Path(i["file_name"]).stem: (i["height"], i["width"]) for i in pred["images"]}
    skipped = {Path(s["file_name"]).stem: s["reason"] for s in pred["skipped"]}
    assert set(done) | set(skipped) == {"normal", *EXTREMES, *HUGE} and not set(done) & set(skipped)
    assert done["normal"] == (40, 48) and done["tall"] == (1500, 3) and done["wide"] == (3, 1500)
    assert all("too large" in skipped[k] for k in HUGE)
    # dino_tiny64 resizes 1 x 1 to 64 x 64, whose 1 x 1 stride-64 level its GroupNorm refuses alone
    assert "cannot process this image (input 64x64)" in skipped["dot"]
    for a in pred["annotations"]:
        h, w = done[Path(pred["images"][[i["id"] for i in pred["images"]].index(a["image_id"])]["file_name"]).stem]
        assert a["segmentation"]["size"] == [h, w]


def test_predict_crash_leaves_no_stale_result(
    predict_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mfdetr.engine.inference.predict import PredictJob, run_predict
    from tests._tiny_detector import NAME

    out = tmp_path / "out"
    out.mkdir()
    for name in ("predictions.json", "results.json"):  # an earlier, complete-looking run
        (out / name).write_text(json.dumps({"images": [], "annotations": []}))
    calls: list[int] = []

    def fails_on_the_second_image(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return Image.new("RGB", (4, 4))

    monkeypatch.setattr("mfdetr.engine.inference.overlay.draw_overlay", fails_on_the_second_image)
    job = PredictJob(
        detector=NAME,
        masknet=predict_setup["masknet"],
        inputs=(str(predict_setup["images"]),),
        out=out,
        checkpoint=predict_setup["det"],
        score_threshold=0.0,
        device="cpu",
    )
    with pytest.raises(OSError, match="No space left"):
        run_predict(job, progress=False, echo=lambda s: None, warn=lambda s: None)
    assert not (out / "predictions.json").exists() and not (out / "results.json").exists()
    assert not list(out.glob("*.tmp"))


# ---- online and detector training -------------------------------------------------------------------
@pytest.mark.slow
def test_online_training_skips_or_replaces_every_extreme_image(
    predict_setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._tiny_detector import NAME, PLUGIN, TINY_MASKNET

    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    coco = tmp_path / "coco"
    ids = extreme_coco(coco, "train2017", normal=2)
    (coco / "train2017" / "normal1.png").write_bytes(b"not an image")  # found only when decoded
    extreme_coco(coco, "val2017", normal=2, seed=1)
    jpeg = io.BytesIO()  # a truncated JPEG: its header is sound, its pixels fail to decode
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 52, 3), np.uint8)).save(jpeg, format="JPEG")
    (coco / "val2017" / "normal1.png").write_bytes(jpeg.getvalue()[:-100])
    run = tmp_path / "run"
    proc = cli(
        "train",
        "--online",
        "--detector",
        NAME,
        "--checkpoint",
        predict_setup["det"],
        "--coco",
        coco,
        "--split",
        "train2017",
        "--val-split",
        "val2017",
        "--topk",
        "10",
        "--out",
        run,
        *TINY_MASKNET,
        "train.device=cpu",
        "train.iterations=4",
        "train.batch_size=1",
        "train.num_workers=0",
        "train.progress=false",
        "train.log_every=1",
        "assign.iou_threshold=0.01",
    )
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    # 1 x 1 → 64 x 64: the tiny detector refuses it alone (probed once); huge headers: never decoded
    assert f"left out image id {ids['dot']} (dot.png): the network cannot process" in proc.stderr
    assert "too large" in proc.stderr
    assert f"skipped {coco / 'train2017' / 'normal1.png'}: corrupt" in proc.stderr
    assert "uses the next image in its place" in proc.stderr
    assert f"skipped {coco / 'val2017' / 'normal1.png'}: corrupt" in proc.stderr  # validation goes on without it
    assert json.loads((run / "val_metrics.json").read_text())["step"] == 4


@pytest.mark.slow
def test_detector_training_replaces_unreadable_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdetr.detectors.training.__main__ import main
    from tests._tiny_detector import NAME

    coco = tmp_path / "coco"
    extreme_coco(coco, "train2017", normal=8)  # the huge headers share the 64 x 64 input group of the 1 x 1 image
    ids = extreme_coco(coco, "val2017", normal=2, seed=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'preset = "{NAME}"\n[data]\nroot = "{coco}"\nval_images = 0\n'
        "[train]\nbatch_size = 2\nepochs = 1\nthreads = 1\nlog_every = 1\n"
    )
    rc = main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "det"), "--max-steps", "3"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Traceback" not in out.err
    assert "too large" in out.err and (tmp_path / "det" / "checkpoint.pt").is_file()
    assert "training uses the next image of its size in its place" in out.err
    # the validation's box AP at the end of the epoch: the 1 x 1 image (64 x 64 input) is refused alone
    assert f"skipped image id {ids['dot']}: the network cannot process this image (input 64x64)" in out.err
    rows = [json.loads(x) for x in (tmp_path / "det" / "log.jsonl").read_text().splitlines()]
    assert any("val" in r for r in rows)
