"""Hostile images: extreme sizes (1500×3, 3×1500, 1×1) and huge headers through the resize rule, the
image loader, the cache (and a stage-2 run and eval on damaged ground truth), and the per-image fallback
that leaves out an image the network refuses. Every case ends processed or as a recorded skip, never a
traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import tests._fake_detector as fd
from mfdetr.errors import SkipImage
from tests._hostile_data import (
    EXTREMES,
    HUGE,
    damage_gt,
    extreme_coco,
    no_traceback,
    png_header_only,
    pycocotools_stats,
)
from tests.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2


# ---- images: resize and decoding --------------------------------------------------------------------
@pytest.mark.parametrize("s,m", [(800, 1333), (160, 224), (64, 96), (48, 80)])
@pytest.mark.parametrize("hw", [*EXTREMES.values(), (3000, 1), (1, 100000), *HUGE.values()])
def test_resize_keeps_a_pixel_per_side(hw: tuple[int, int], s: int, m: int) -> None:
    from mfdetr.data import resized_hw

    oh, ow = resized_hw(*hw, s, m)
    assert oh >= 1 and ow >= 1
    assert max(oh, ow) <= max(m, max(hw))  # the official rule leaves an image alone when its short side fits
    assert (oh >= ow) == (hw[0] >= hw[1])  # orientation kept


def test_resize_of_an_extreme_image_caps_the_long_side() -> None:
    from mfdetr.contracts import Preprocessing
    from mfdetr.data import EvalTransform, resized_hw

    assert resized_hw(1500, 3, 160, 224) == (224, 1)  # the official rule would give 0 x 0
    assert resized_hw(1, 3000, 800, 1333) == (1, 1333)
    assert resized_hw(1500, 3, 800, 1333) == (1500, 3)  # short side already the target: left alone
    x = EvalTransform(preprocessing=Preprocessing(short_side=160, max_size=224))(
        Image.fromarray(np.zeros((1500, 3, 3), np.uint8))
    )
    assert x.shape == (3, 224, 1) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_headers_are_refused_before_decoding(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mfdetr.data import load_rgb

    path = png_header_only(tmp_path / "x.png", *HUGE[name])
    decoded: list[int] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(SkipImage, match="too large"):
        load_rgb(path)
    assert not decoded


# ---- the cache and stage 2 on extreme images and damaged GT ------------------------------------------------
@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fd.register()
    root = tmp_path_factory.mktemp("hostile_cache")
    ids = extreme_coco(root / "coco", "val2017", normal=3)
    clean, _ = damage_gt(root / "coco" / "annotations" / "instances_val2017.json")
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    store = root / "store"
    args = [
        "cache",
        "--detector",
        fd.NAME,
        "--checkpoint",
        ckpt,
        "--coco",
        root / "coco",
        "--split",
        "val2017",
        "--out",
        store,
        "--topk",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]
    out = {
        "root": root,
        "ids": ids,
        "clean": clean,
        "store": store,
        "args": args,
        "first": cli(*args),
        "again": cli(*args),
    }
    extreme_coco(root / "coco", "train2017", normal=3, seed=1)
    train_args = [str(a) for a in args]
    train_args[train_args.index("val2017")] = "train2017"
    train_args[train_args.index(str(store))] = str(root / "train_store")
    assert cli(*train_args).returncode == 0
    return out


def test_cache_processes_or_records_every_extreme_image(stage1: dict[str, Any]) -> None:
    first, again = stage1["first"], stage1["again"]
    assert first.returncode == 0, first.stderr
    no_traceback(first)
    n = len(stage1["ids"])
    assert f"store {stage1['store']}: {n - 2} done, 2 skipped, 0 pending" in first.stdout
    for stem in HUGE:
        assert f"(image id {stage1['ids'][stem]}): " in first.stdout
    assert first.stdout.count("too large") == 2
    assert again.returncode == 0 and "done: 0 images this run" in again.stdout  # a rerun has nothing left
    no_traceback(again)


def test_cache_records_an_image_the_detector_cannot_process(
    stage1: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detect = fd.FakeDetector.detect

    def picky(self: Any, batch: Any, **kw: Any) -> Any:
        if int(batch.input_hw[:, 1].min()) < 2:
            raise ValueError("input narrower than 2 pixels")
        return detect(self, batch, **kw)

    monkeypatch.setattr(fd.FakeDetector, "detect", picky)
    args = [str(a) for a in stage1["args"]]
    args[args.index("--out") + 1] = str(tmp_path / "store")
    proc = cli(*args, "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    n = len(stage1["ids"])
    assert f"{n - 3} done, 3 skipped, 0 pending" in proc.stdout
    assert (
        f"(image id {stage1['ids']['tall']}): " in proc.stdout
        and "cannot process this image (input 80x1)" in proc.stdout
    )


@pytest.mark.slow
def test_train_val_cache_and_eval_on_damaged_ground_truth(stage1: dict[str, Any]) -> None:
    root, store = stage1["root"], stage1["store"]
    fd.make_oracle(store, stage1["clean"])  # the cached detector returns the undamaged GT: box AP 100
    cfg = fd.write_run_config(
        root / "tiny.toml", device="cpu", iterations=2, batch_size=2, log_every=1, num_workers=0, progress=False
    )
    run = root / "run"
    proc = cli("train", "--cache", root / "train_store", "--val-cache", store, "--config", cfg, "--out", run)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    ann = root / "coco" / "annotations" / "instances_val2017.json"
    assert proc.stderr.count(f"{ann}: ignored") == 1  # one file, parsed once for training and validation
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert metrics["bbox"]["AP"] == 100.0  # scored on exactly the undamaged instances
    results = json.loads((run / "val_results.json").read_text())
    assert results and {r["image_id"] for r in results} == set(stage1["ids"].values()) - {
        stage1["ids"][k] for k in HUGE
    }
    with open(stage1["clean"]) as f:  # pycocotools on the processed images of the undamaged GT
        clean = json.load(f)
    kept = {r["image_id"] for r in results}
    clean["images"] = [im for im in clean["images"] if im["id"] in kept]
    clean["annotations"] = [a for a in clean["annotations"] if a["image_id"] in kept]
    sub_gt = root / "clean_processed.json"
    sub_gt.write_text(json.dumps(clean))
    want = pycocotools_stats(sub_gt, results, "segm")
    got = [metrics["segm"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    assert all(
        (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9) for a, b in zip(got, want, strict=True)
    ), (got, want)
    proc = cli("eval", "--cache", store, "--checkpoint", run / "ckpt.pt")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert "segm" in proc.stdout and proc.stderr.count("ignored") == 1


# ---- the per-image fallback ---------------------------------------------------------------------------
def _batch(root: Path, n: int) -> Any:
    from mfdetr.data import CocoInstances, collate

    fd.make_coco(root, n=n)
    ds = CocoInstances(root, "val2017", preprocessing=fd.PRESET.preprocessing)
    return collate([ds[i] for i in range(n)])


def test_run_or_skip_retries_each_image_alone(tmp_path: Path) -> None:
    from mfdetr.data import run_or_skip

    batch = _batch(tmp_path, 3)

    def net(b: Any) -> list[int]:
        if 2 in b.image_ids:
            raise RuntimeError("shape check failed\nsecond line")
        return list(b.image_ids)

    done, failed = run_or_skip(net, batch)
    assert [r for _, r in done] == [[1], [3]] and [p.image_ids for p, _ in done] == [[1], [3]]
    h, w = batch.input_hw[0].tolist()
    assert tuple(done[0][0].images.shape[-2:]) == (h, w)  # each image cut to its own size
    assert failed == [
        (
            1,
            f"the network cannot process this image (input {batch.input_hw[1, 0]}x"
            f"{batch.input_hw[1, 1]}): RuntimeError: shape check failed",
        )
    ]

    def oom(b: Any) -> None:
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # depends on the batch, not on an image: raised
        run_or_skip(oom, batch)


def test_online_step_leaves_out_an_image_the_detector_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mfdetr.engine.online import DetectorStep

    fd.register()
    batch = _batch(tmp_path, 3)
    det = fd.FakeDetector(state=fd.fake_state_dict())
    detect = det.detect

    def picky(b: Any, **kw: Any) -> Any:
        if 3 in b.image_ids:
            raise ValueError("too small")
        return detect(b, **kw)

    det.detect = picky  # type: ignore[method-assign]
    step = DetectorStep(detector=det, topk=8, enc_layers=(4,))
    out = step(batch, torch.device("cpu"))
    assert out.det.extras["image_id"] == [1, 2] and len(out.targets) == 2
    assert [t.image_id for t in out.targets] == [1, 2] and out.det.queries.shape[0] == 2
    assert "left out image id 3 (000003.png): the network cannot process" in capsys.readouterr().err
