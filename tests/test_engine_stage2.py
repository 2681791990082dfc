"""Stage 2 on a real (tiny) cache: CacheDataset, train → checkpoint → eval, exact resume of the real
MaskNet, and bad input (incomplete cache, other detector, other annotations, other MaskNet config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tests._fake_detector as fd
from tests._fake_detector import TINY, make_oracle, tiny_cfg, write_cache
from mfdetr.engine import build_run_config, collate_detector_outputs, read_jsonl
from mfdetr.engine.config import replace_train
from mfdetr.engine.cache_data import CacheDataset, open_annotations, open_cache
from mfdetr.engine.stage2 import CacheSources, eval_from_cache, train_from_cache
from mfdetr.errors import MfdetrError


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fd.register()
    root = tmp_path_factory.mktemp("stage2")
    coco = root / "coco"
    fd.make_coco(coco, n=5, split="train2017")
    fd.make_coco(coco, n=3, split="val2017", seed=1)
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    other = fd.save_fake_checkpoint(root / "other.pth", seed=1)
    for split in ("train2017", "val2017"):
        make_oracle(
            write_cache(coco, split, root / f"c_{split[:-4]}", ckpt), coco / "annotations" / f"instances_{split}.json"
        )
    return {
        "root": root,
        "coco": coco,
        "train": root / "c_train",
        "val": root / "c_val",
        "val_other": write_cache(coco, "val2017", root / "c_val_other", other),
        "half": write_cache(coco, "train2017", root / "c_half", ckpt, shard=(0, 2)),
    }


def test_cache_dataset_yields_cached_fields_and_gt(data: dict[str, Path]) -> None:
    store = open_cache(data["train"], enc_layer=4)
    ds = CacheDataset(store=store, coco_split=open_annotations(store, coco=data["coco"]), enc_layer=4)
    assert len(ds) == 5 and ds.image_ids == [1, 2, 3, 4, 5]
    det, gt = ds[0]
    assert det.batch_size == 1 and det.queries.dtype == torch.float16 and list(det.enc_maps) == [4]
    assert gt.image_id == 1 and len(gt) == 1 and tuple(gt.masks.shape[1:]) == tuple(det.orig_hw[0].tolist())
    assert len(ds[1][1]) == 0  # image 2 has no annotation: a valid, empty target
    batch = collate_detector_outputs([ds[i] for i in range(3)])
    batch.det.validate()
    assert batch.det.extras["image_id"] == [1, 2, 3]
    hw = [ds[i][0].c1.shape[-2:] for i in range(3)]
    assert tuple(batch.det.c1.shape[-2:]) == (max(h for h, _ in hw), max(w for _, w in hw))
    with pytest.raises(MfdetrError, match="encoder layers"):
        open_cache(data["train"], enc_layer=6)


def test_incomplete_cache_warns_or_refuses(data: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    store = open_cache(data["half"], enc_layer=4)
    coco = open_annotations(store, coco=data["coco"])
    ds = CacheDataset(store=store, coco_split=coco, enc_layer=4)
    assert len(ds) == 3 and "using 3 of 5 images (2 not written yet" in capsys.readouterr().err
    with pytest.raises(MfdetrError, match="incomplete: 2 of 5 images"):
        CacheDataset(store=store, coco_split=coco, enc_layer=4, require_complete=True)


def test_annotation_file_must_be_the_one_the_manifest_names(data: dict[str, Path], tmp_path: Path) -> None:
    store = open_cache(data["train"])
    bad = tmp_path / "instances_train2017.json"
    d = json.loads((data["coco"] / "annotations" / "instances_train2017.json").read_text())
    d["annotations"] = d["annotations"][:-1]
    bad.write_text(json.dumps(d))
    with pytest.raises(MfdetrError, match="sha256 differs"):
        open_annotations(store, coco=data["coco"], annotations=bad)
    # without --coco: the folder `mfdetr cache` recorded in the store, while it still exists
    hinted = open_annotations(store, coco=None)
    assert hinted.annotation_file.resolve() == (data["coco"] / "annotations" / "instances_train2017.json").resolve()
    assert len(hinted) == 5
    moved = tmp_path / "moved_store"
    shutil.copytree(data["train"], moved)
    hint = json.loads((moved / "mfdetr_source.json").read_text())
    (moved / "mfdetr_source.json").write_text(json.dumps({**hint, "coco_root": str(tmp_path / "gone")}))
    with pytest.raises(MfdetrError, match="--coco"):
        open_annotations(open_cache(moved), coco=None)


def test_train_checkpoint_eval_and_refusals(data: dict[str, Path], tmp_path: Path) -> None:
    src = CacheSources(cache=data["train"], coco=data["coco"], val_cache=data["val"])
    run = tmp_path / "run"
    cfg = build_run_config(tiny_cfg(iterations=30, lr=1e-3, log_every=5))
    res, metrics = train_from_cache(cfg, src, run)
    assert res is not None and res.steps == 30 and set(metrics) == {"segm", "boundary", "bbox"}
    # the oracle cache's boxes are exact; 30 steps teach MaskNet to fill them (the GT masks are boxes)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] >= 90.0
    assert 0.0 <= metrics["boundary"]["AP"] <= 100.0
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["boundary_AP"] == pytest.approx(metrics["boundary"]["AP"], nan_ok=True)
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    rj = json.loads((run / "run.json").read_text())
    assert rj["detector"]["detector.name"] == fd.NAME and len(rj["manifest_sha256"]) == 64
    assert rj["complexity"]["params_m"] * 1e6 == pytest.approx(rj["trainable_params"])
    assert json.loads((run / "val_metrics.json").read_text())["step"] == 30
    # evaluation from the checkpoint alone reproduces the end-of-training numbers
    out = tmp_path / "results.json"
    m = eval_from_cache(CacheSources(cache=data["val"], coco=data["coco"]), checkpoint=run / "ckpt.pt", out=out)
    assert json.dumps(m, sort_keys=True) == json.dumps(metrics, sort_keys=True)  # NaN-safe equality
    fast = eval_from_cache(
        CacheSources(cache=data["val"], coco=data["coco"]), checkpoint=run / "ckpt.pt", evaluator="faster"
    )
    for t in ("segm", "bbox", "boundary"):  # faster-coco-eval scores segm/bbox as pycocotools does
        assert fast[t] == pytest.approx(m[t], abs=0.01, nan_ok=True), t
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == {1, 3} and {"segmentation", "score"} <= set(results[0])
    # bad input → clear errors
    with pytest.raises(MfdetrError, match="checkpoint.sha256"):
        eval_from_cache(CacheSources(cache=data["val_other"], coco=data["coco"]), checkpoint=run / "ckpt.pt")
    with pytest.raises(MfdetrError, match="different MaskNet config.*roi_size"):
        eval_from_cache(
            CacheSources(cache=data["val"], coco=data["coco"]),
            checkpoint=run / "ckpt.pt",
            overrides=["masknet.roi_size=16"],
        )
    with pytest.raises(MfdetrError, match="unknown key.*depth"):
        train_from_cache(build_run_config(tiny_cfg(), ["masknet.image_encoder.depth=3"]), src, tmp_path / "r2")
    with pytest.raises(MfdetrError, match="checkpoint.sha256"):
        train_from_cache(
            build_run_config(tiny_cfg()),
            CacheSources(cache=data["train"], coco=data["coco"], val_cache=data["val_other"]),
            tmp_path / "r3",
        )


def test_real_masknet_resumes_exactly(data: dict[str, Path], tmp_path: Path) -> None:
    """A run resumed from its step-3 checkpoint logs the same losses (point sampling included)."""
    src = CacheSources(cache=data["train"], coco=data["coco"])
    cfg = build_run_config(tiny_cfg(iterations=6, checkpoint_every=3, keep_checkpoints=True))
    full = tmp_path / "full"
    train_from_cache(cfg, src, full)
    cut = tmp_path / "cut"  # what a run killed after its step-3 checkpoint leaves behind
    cut.mkdir()
    shutil.copy(full / "ckpt_0000003.pt", cut / "ckpt.pt")
    shutil.copy(full / "config.json", cut / "config.json")
    recs = [r for r in read_jsonl(full / "metrics.jsonl") if r["step"] <= 5]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # resumed with a DataLoader worker (the uninterrupted run had none): the order must not depend on it
    train_from_cache(replace_train(cfg, num_workers=1), src, cut, resume=True)
    a = [(r["step"], r["loss"]) for r in read_jsonl(full / "metrics.jsonl") if r["kind"] == "train"]
    b = [(r["step"], r["loss"]) for r in read_jsonl(cut / "metrics.jsonl") if r["kind"] == "train"]
    assert a == b and len(a) == 6
    sa, sb = (
        torch.load(full / "ckpt.pt", weights_only=False)["model"],
        torch.load(cut / "ckpt.pt", weights_only=False)["model"],
    )
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sweep_from_one_cache_and_training_free_eval(data: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.engine.stage2 import sweep_from_cache
    from mfdetr.engine.sweep import load_sweep

    lines = [
        "[sweep]",
        'table = "Table X"',
        'title = "tiny"',
        'columns = ["# layers"]',
        "[base.train]",
        'device = "cpu"',
        "iterations = 2",
        "batch_size = 2",
        "num_workers = 0",
        "progress = false",
        "[base.masknet]",
    ]
    lines += [
        f"{k} = {json.dumps(v)}"
        if not isinstance(v, dict)
        else "\n".join(f"{k}.{kk} = {json.dumps(vv)}" for kk, vv in v.items())
        for k, v in TINY.items()
    ]
    lines += [
        "[[variants]]",
        'name = "l0"',
        'labels = ["0"]',
        'set = ["masknet.image_encoder.layers=0"]',
        "[[variants]]",
        'name = "l1"',
        'labels = ["1"]',
        'set = ["masknet.image_encoder.layers=1"]',
        "paper = { AP = 30.8, params_m = 0.76 }",
    ]
    f = tmp_path / "tiny_sweep.toml"
    f.write_text("\n".join(lines) + "\n")
    res = sweep_from_cache(
        load_sweep(f),
        CacheSources(cache=data["train"], coco=data["coco"], val_cache=data["val"]),
        tmp_path / "sweep",
        log=lambda s: None,
    )
    assert [r.name for r in res] == ["l0", "l1"]
    assert res[1].params_m > res[0].params_m > 0 and res[1].flops_g > res[0].flops_g > 0  # one more encoder layer
    assert all(r.metrics.keys() >= {"AP", "AP50", "APs", "boundary_AP"} for r in res)
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| AP^boundary |" in md
    assert md.count("\n| 0 |") == 1 and "| 30.8 | 0.76 M |" in md
    assert (tmp_path / "sweep" / "l1" / "run" / "ckpt.pt").is_file()

    # Table 1-style training-free baseline: evaluated from a config, no checkpoint
    free = tmp_path / "free.toml"
    free.write_text(
        "[masknet]\nnum_queries = 8\nfuse_c1 = false\nneck.enabled = false\nimage_encoder.layers = 0\n"
        "box_encoder.layers = 0\nbox_encoder.dim = 16\nquery_encoder.ffn = false\nquery_encoder.b2o = false\n"
        "mask_scoring.enabled = false\n"
    )
    m = eval_from_cache(CacheSources(cache=data["val"], coco=data["coco"]), config=free)
    assert m["bbox"]["AP"] == pytest.approx(100.0) and 0.0 <= m["segm"]["AP"] <= 100.0
    trainable = tmp_path / "trainable.toml"
    trainable.write_text(
        "\n".join(lines[lines.index("[base.masknet]") : lines.index("[[variants]]")]).replace(
            "[base.masknet]", "[masknet]"
        )
        + "\n"
    )
    with pytest.raises(MfdetrError, match="--checkpoint"):
        eval_from_cache(CacheSources(cache=data["val"], coco=data["coco"]), config=trainable)


def test_online_training_equals_cached_training(data: dict[str, Path], tmp_path: Path) -> None:
    """With the online features rounded through the cache's float16, the frozen detector
    in the loop gives the same losses as the cache it wrote (CPU, ≤ 1e-5)."""
    from mfdetr.engine.online import train_online

    ckpt = data["root"] / "fake.pth"
    cache = write_cache(data["coco"], "train2017", tmp_path / "cache", ckpt)
    # random fake boxes rarely overlap the GT: accept any overlap so every step has positives
    cfg = build_run_config({**tiny_cfg(iterations=4), "assign": {"iou_threshold": 0.01}})
    train_from_cache(cfg, CacheSources(cache=cache, coco=data["coco"]), tmp_path / "cached")
    train_online(
        cfg,
        detector=fd.NAME,
        checkpoint=str(ckpt),
        coco=str(data["coco"]),
        split="train2017",
        out=str(tmp_path / "online"),
        topk=8,
    )
    a = [r for r in read_jsonl(tmp_path / "cached" / "metrics.jsonl") if r["kind"] == "train"]
    b = [r for r in read_jsonl(tmp_path / "online" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(a) == len(b) == 4 and sum(r["loss"] > 0 for r in a) >= 3
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5) and rb["num_pos"] == ra["num_pos"]
        assert rb["pos_per_image"] == ra["pos_per_image"] == ra["num_pos"] / 2  # the positive rate is logged
    rj = json.loads((tmp_path / "online" / "run.json").read_text())
    assert rj["online"]["detector"] == fd.NAME


def test_positive_cap_in_cached_training(data: dict[str, Path], tmp_path: Path) -> None:
    """``assign.max_positives_per_image`` caps what the training loop trains on (positives per image)."""
    import zarr

    cache = tmp_path / "dups"
    shutil.copytree(data["train"], cache)
    g = zarr.open_group(str(cache), mode="r+")
    for i in range(g["boxes"].shape[0]):  # every query repeats the oracle box: all K are positives
        boxes = g["boxes"][i]
        boxes[1:] = boxes[0]
        g["boxes"][i] = boxes
    runs, src = {}, CacheSources(cache=cache, coco=data["coco"])
    for cap in (0, 1):
        cfg = build_run_config(
            {
                **tiny_cfg(iterations=4, checkpoint_every=2, keep_checkpoints=True),
                "assign": {"max_positives_per_image": cap},
            }
        )
        train_from_cache(cfg, src, tmp_path / f"cap{cap}")
        runs[cap] = [r for r in read_jsonl(tmp_path / f"cap{cap}" / "metrics.jsonl") if r["kind"] == "train"]
    # the sampled positives are a function of (seed, step, image): a resumed run trains on the same ones
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "cap1" / "ckpt_0000002.pt", cut / "ckpt.pt")
    train_from_cache(cfg, src, cut, resume=True)
    resumed = [r for r in read_jsonl(cut / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in runs[1][2:]]
    assert max(r["pos_per_image"] for r in runs[0]) > 1  # uncapped: several positives per image
    for r, r0 in zip(runs[1], runs[0], strict=True):  # same images per step (same seed)
        assert r["pos_per_image"] <= 1 and r["num_pos"] <= min(2, r0["num_pos"])
        assert (r["num_pos"] > 0) == (r0["num_pos"] > 0)


def test_images_kept_in_memory_train_the_same(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three epochs with the read images kept in memory log the same losses and end with the same weights
    as reading every image from the store every time, and read each image once; a negative budget is refused."""
    from mfdetr.cache import CacheStore

    read, real = [], CacheStore.read_many
    monkeypatch.setattr(CacheStore, "read_many", lambda self, idx, **kw: read.append(len(idx)) or real(self, idx, **kw))
    src = CacheSources(cache=data["train"], coco=data["coco"])
    runs, reads = {}, {}
    for mb in (0, 64):
        read.clear()
        cfg = build_run_config({**tiny_cfg(iterations=8), "data": {"memory_cache_mb": mb}})
        train_from_cache(cfg, src, tmp_path / f"m{mb}")
        runs[mb] = (
            [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / f"m{mb}" / "metrics.jsonl") if r["kind"] == "train"],
            torch.load(tmp_path / f"m{mb}" / "ckpt.pt", weights_only=True)["model"],
        )
        reads[mb] = sum(read)
    assert reads == {0: 16, 64: 5}  # 8 steps of 2 images; the 5 images once each
    (la, sa), (lb, sb) = runs[0], runs[64]
    assert la == lb and len(la) == 8
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(MfdetrError, match="memory_cache_mb must be >= 0"):
        build_run_config({**tiny_cfg(), "data": {"memory_cache_mb": -1}})
