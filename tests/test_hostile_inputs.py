"""Hostile inputs, each built here: extreme images (1500×3, 3×1500, 1×1, huge headers) through cache,
predict, online and detector training; damaged ground truth (degenerate polygons, garbage RLE, bad
boxes, non-integer ids) through eval-json, train --val-cache and eval. Every case ends processed or
as a recorded skip / one-line error, never a traceback, and scores as pycocotools on the GT without
the damaged instances."""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import tests._fake_detector as fd
from mfdetr.errors import SkipImage
from tests.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2

#: (height, width) of the extreme images every command must survive
EXTREMES = {"tall": (1500, 3), "wide": (3, 1500), "dot": (1, 1)}
#: headers declaring more pixels than are ever decoded (no pixel data behind them)
HUGE = {"huge": (20000, 20000), "bomb": (10000, 10000)}


def png_header_only(path: Path, h: int, w: int) -> Path:
    """A PNG whose header declares ``w × h`` RGB pixels, with a single row of data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * w)))
                     + chunk(b"IEND", b""))
    return path


def extreme_coco(root: Path, split: str, *, normal: int = 2, seed: int = 0) -> dict[str, int]:
    """A COCO split: ``normal`` ordinary images plus every extreme and huge one (one box instance each
    where there is room). Returns file stem → image id."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    sizes = {f"normal{k}": [(30, 44), (36, 52)][k % 2] for k in range(normal)}
    sizes.update(EXTREMES)
    images, anns, ids = [], [], {}
    for i, (stem, (h, w)) in enumerate([*sizes.items(), *HUGE.items()], start=1):
        if stem in HUGE:
            png_header_only(root / split / f"{stem}.png", h, w)
        else:
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / f"{stem}.png")
        ids[stem] = i
        images.append({"id": i, "file_name": f"{stem}.png", "height": h, "width": w})
        bw, bh = max(1, w // 2), max(1, h // 2)
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": float(bw * bh),
                     "bbox": [0, 0, bw, bh], "segmentation": [[0, 0, bw, 0, bw, bh, 0, bh]]})
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return ids


def no_traceback(proc: Any) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


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
        Image.fromarray(np.zeros((1500, 3, 3), np.uint8)))
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


# ---- ground truth -------------------------------------------------------------------------------------
def _bad_instances(h: int, w: int, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One annotation per kind of damage (ids from ``first_id``; the last two have no integer id)."""
    base = {"image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 20.0, "bbox": [1, 1, 5, 4]}
    segs: list[Any] = [
        [[1.0, 1.0, 6.0, 5.0]],                                # 4 numbers: pycocotools would read a box
        [[1.0, 1.0, 6.0, 1.0, 6.0]],                           # odd length
        [[1.0, 1.0, 6.0, 1.0, float("nan"), 5.0]],             # non-finite
        [],                                                    # no polygon
        {"size": [h, w], "counts": "zzzz~~~~garbage"},         # undecodable compressed counts
        {"size": [h, w], "counts": "1234567"},                 # decodes, but not h*w pixels
        {"size": [h, w], "counts": [5, -3, h * w - 2]},        # negative count
        {"size": [h + 1, w], "counts": [(h + 1) * w]},         # size differs from the image
    ]
    out = [{**base, "id": first_id + k, "segmentation": s} for k, s in enumerate(segs)]
    good = [[1.0, 1.0, 6.0, 1.0, 6.0, 5.0, 1.0, 5.0]]
    n = first_id + len(out)
    out += [{**base, "id": n, "segmentation": good, "bbox": [1, 1, 0, 4]},       # zero width
            {**base, "id": n + 1, "segmentation": good, "bbox": [1, 1, -5, 4]},  # negative width
            {**base, "id": n + 2, "segmentation": good, "iscrowd": 2},
            {**base, "id": n + 3, "segmentation": good, "image_id": [image_id]},  # list-valued image id
            {**base, "id": "n4", "segmentation": good},                          # non-integer ids
            {**base, "segmentation": good}]
    return out


def damage_gt(path: Path) -> tuple[Path, set[int]]:
    """Add the bad instances of :func:`_bad_instances` to every image of an annotation file; write the
    same file without them (what pycocotools is given directly). Returns (clean file, bad int ids)."""
    data = json.loads(path.read_text())
    clean = path.with_name(path.stem + "_clean.json")
    clean.write_text(json.dumps(data))
    next_id = max(a["id"] for a in data["annotations"]) + 1
    bad: list[dict[str, Any]] = []
    for im in data["images"]:
        bad += _bad_instances(im["height"], im["width"], im["id"], next_id + len(bad))
    data["annotations"] += bad
    path.write_text(json.dumps(data))
    return clean, {a["id"] for a in bad if isinstance(a.get("id"), int)}


def test_ground_truth_is_cleaned_and_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdetr.data import CocoInstances, load_annotations

    fd.make_coco(tmp_path, n=3)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0].pop("area")  # filled with the mask's area
    data["annotations"][1].pop("iscrowd")  # filled with 0
    ann.write_text(json.dumps(data))
    _, bad_ids = damage_gt(ann)
    capsys.readouterr()
    f = load_annotations(ann)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mfdetr: warning: {ann}: ignored {3 * 14} of {3 * 14 + 2}")
    assert "polygon with < 3 points" in err[0] and "undecodable compressed RLE" in err[0]
    assert {a["id"] for a in f.data["annotations"]} == {1, 3}
    assert not bad_ids & {a["id"] for a in f.data["annotations"]}
    kept = {a["id"]: a for a in f.data["annotations"]}
    assert kept[1]["area"] == pytest.approx(float((44 // 2 - 44 // 4) * (30 // 2 - 30 // 4)))
    assert kept[3]["iscrowd"] == 0
    ds = CocoInstances(tmp_path, "val2017")  # training targets: only the usable instances
    assert [len(ds.load_targets(i)) for i in ds.image_ids] == [1, 0, 1]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id 1"),
    (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99 (annotation id 1)"),
])
def test_unusable_ground_truth_is_one_line(tmp_path: Path, mutate: Any, needle: str) -> None:
    fd.make_coco(tmp_path, n=3)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    proc = cli("eval-json", "--coco", tmp_path, "--results", ann)
    assert proc.returncode == 2 and needle in proc.stderr and str(ann) in proc.stderr
    no_traceback(proc)


def _pycocotools(gt_file: Path, results: list[dict[str, Any]], iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dets = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v * 100) if v >= 0 else math.nan for v in ev.stats[:6]]


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("segm", "bbox"):
            rows[parts[0]] = [float(v) for v in parts[1:]]
    return rows


def test_eval_json_on_damaged_ground_truth_equals_pycocotools_on_the_clean_one(tmp_path: Path) -> None:
    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.evaluation import gt_to_results, load_coco_gt

    generate_synth(tmp_path, config=SynthConfig(train=1, val=6, image_size=64, seed=2))
    ann = tmp_path / "annotations" / "instances_val2017.json"
    rng = np.random.default_rng(0)
    results = gt_to_results(load_coco_gt(ann))
    for r in results:  # imperfect: jittered boxes, random scores, some dropped
        r["bbox"] = [v + float(rng.normal(0, 1.5)) for v in r["bbox"]]
        r["score"] = float(rng.uniform(0.1, 1.0))
    results = [r for r in results if rng.random() < 0.8]
    res_file = tmp_path / "res.json"
    res_file.write_text(json.dumps(results))
    clean, _ = damage_gt(ann)
    proc = cli("eval-json", "--coco", tmp_path, "--results", res_file, "--iou-type", "both")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert len([ln for ln in proc.stderr.splitlines() if "ignored" in ln]) == 1
    table = _table(proc.stdout)
    for t in ("segm", "bbox"):
        want = _pycocotools(clean, results, t)
        assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=0.006)
                   for a, b in zip(table[t], want, strict=True)), (t, table[t], want)
        assert 5.0 < table[t][0] < 100.0


# ---- the cache and stage 2 on extreme images and damaged GT ------------------------------------------------
@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fd.register()
    root = tmp_path_factory.mktemp("hostile_cache")
    ids = extreme_coco(root / "coco", "val2017", normal=3)
    clean, _ = damage_gt(root / "coco" / "annotations" / "instances_val2017.json")
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    store = root / "store"
    args = ["cache", "--detector", fd.NAME, "--checkpoint", ckpt, "--coco", root / "coco", "--split", "val2017",
            "--out", store, "--topk", "8", "--workers", "0", "--no-progress"]
    out = {"root": root, "ids": ids, "clean": clean, "store": store, "args": args,
           "first": cli(*args), "again": cli(*args)}
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


def test_cache_records_an_image_the_detector_cannot_process(stage1: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert f"(image id {stage1['ids']['tall']}): " in proc.stdout and "cannot process this image (input 80x1)" \
        in proc.stdout


@pytest.mark.slow
def test_train_val_cache_and_eval_on_damaged_ground_truth(stage1: dict[str, Any]) -> None:
    root, store = stage1["root"], stage1["store"]
    fd.make_oracle(store, stage1["clean"])  # the cached detector returns the undamaged GT: box AP 100
    cfg = fd.write_run_config(root / "tiny.toml", device="cpu", iterations=2, batch_size=2, log_every=1, num_workers=0,
                              progress=False)
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
        stage1["ids"][k] for k in HUGE}
    with open(stage1["clean"]) as f:  # pycocotools on the processed images of the undamaged GT
        clean = json.load(f)
    kept = {r["image_id"] for r in results}
    clean["images"] = [im for im in clean["images"] if im["id"] in kept]
    clean["annotations"] = [a for a in clean["annotations"] if a["image_id"] in kept]
    sub_gt = root / "clean_processed.json"
    sub_gt.write_text(json.dumps(clean))
    want = _pycocotools(sub_gt, results, "segm")
    got = [metrics["segm"][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)
               for a, b in zip(got, want, strict=True)), (got, want)
    proc = cli("eval", "--cache", store, "--checkpoint", run / "ckpt.pt")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert "segm" in proc.stdout and proc.stderr.count("ignored") == 1


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
    model = build_masknet(cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides,
                          c1_channels=preset.c1_channels)
    masknet = root / "masknet.pt"
    torch.save({"masknet_config": to_dict(cfg), "model": model.state_dict(), "detector": NAME}, masknet)
    return {"root": root, "images": images, "det": save_detector_checkpoint(root / "det.pth"), "masknet": masknet}


def _predict_args(s: dict[str, Path], out: Path) -> list[Any]:
    from tests._tiny_detector import NAME

    return ["predict", s["images"], "--detector", NAME, "--checkpoint", s["det"], "--masknet", s["masknet"],
            "--out", out, "--score-threshold", "0", "--device", "cpu", "--no-progress", "--no-overlays"]


def test_predict_processes_or_records_every_extreme_image(predict_setup: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_predict_crash_leaves_no_stale_result(predict_setup: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
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
    job = PredictJob(detector=NAME, masknet=predict_setup["masknet"], inputs=(str(predict_setup["images"]),),
                     out=out, checkpoint=predict_setup["det"], score_threshold=0.0, device="cpu")
    with pytest.raises(OSError, match="No space left"):
        run_predict(job, progress=False, echo=lambda s: None, warn=lambda s: None)
    assert not (out / "predictions.json").exists() and not (out / "results.json").exists()
    assert not list(out.glob("*.tmp"))


# ---- online and detector training -------------------------------------------------------------------
@pytest.mark.slow
def test_online_training_skips_or_replaces_every_extreme_image(predict_setup: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
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
    proc = cli("train", "--online", "--detector", NAME, "--checkpoint", predict_setup["det"], "--coco", coco,
               "--split", "train2017", "--val-split", "val2017", "--topk", "10", "--out", run, *TINY_MASKNET,
               "train.device=cpu", "train.iterations=4", "train.batch_size=1", "train.num_workers=0",
               "train.progress=false", "train.log_every=1", "assign.iou_threshold=0.01")
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
    recipe.write_text(f'preset = "{NAME}"\n[data]\nroot = "{coco}"\nval_images = 0\n'
                      '[train]\nbatch_size = 2\nepochs = 1\nthreads = 1\nlog_every = 1\n')
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
    assert failed == [(1, f"the network cannot process this image (input {batch.input_hw[1, 0]}x"
                          f"{batch.input_hw[1, 1]}): RuntimeError: shape check failed")]

    def oom(b: Any) -> None:
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # depends on the batch, not on an image: raised
        run_or_skip(oom, batch)


def test_online_step_leaves_out_an_image_the_detector_refuses(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
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
