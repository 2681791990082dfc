"""Cached flip views (``mfdetr cache --views orig,hflip``): the flipped view is a second detector run on
the flipped image, its GT is flipped to match, training draws one view per image and epoch (seeded,
resumed exactly), evaluation reads the original view only, and stores without views still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tests._fake_detector as fd
from mfdetr.cache import CacheJob, CacheStore, inspect_store, run_cache
from mfdetr.cache.views import combined_commit, parse_views
from mfdetr.data.flip import hflip_instances
from mfdetr.data.masks import masks_to_boxes_xyxy
from mfdetr.engine import build_run_config, read_jsonl
from mfdetr.engine.cache_data import CacheDataset, open_annotations
from mfdetr.engine.cache_views import ViewSampledDataset, choose_view
from mfdetr.engine.config import replace_train
from mfdetr.engine.stage2 import CacheSources, eval_from_cache, train_from_cache
from mfdetr.errors import MfdetrError
from tests._fake_detector import tiny_cfg

VIEWS = ("orig", "hflip")


def _cache(
    coco: Path,
    split: str,
    out: Path,
    ckpt: Path,
    detector: str = fd.NAME,
    enc_layers: tuple[int, ...] = (4,),
    **kw: object,
) -> Path:
    run_cache(
        CacheJob(
            detector=detector,
            checkpoint=ckpt,
            coco=coco,
            split=split,
            out=out,
            topk=8,
            enc_layers=enc_layers,
            num_workers=0,
            **kw,
        ),
        progress=False,
        echo=lambda *a, **k: None,
    )
    return out


def _oracle(store: Path, annotation_file: Path) -> Path:
    """Every view's boxes/logits replaced by the GT (mirrored for the flipped view), so the tiny MaskNet
    has positives to learn from (query k = annotation k, class slot 1 = category 1)."""
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    d = json.loads(annotation_file.read_text())
    imgs = {im["id"]: im for im in d["images"]}
    for view in CacheStore.open(store).views:
        pre = "" if view == "orig" else f"{view}_"
        for i, iid in enumerate(g["image_ids"][:].tolist()):
            boxes, logits = g[pre + "boxes"][i], np.full(g[pre + "logits"][i].shape, -10.0, dtype=np.float32)
            for k, a in enumerate([a for a in d["annotations"] if a["image_id"] == iid][: len(boxes)]):
                x, y, w, h = a["bbox"]
                cx = (x + w / 2) / imgs[iid]["width"]
                boxes[k] = [
                    cx if view == "orig" else 1 - cx,
                    (y + h / 2) / imgs[iid]["height"],
                    w / imgs[iid]["width"],
                    h / imgs[iid]["height"],
                ]
                logits[k, 1] = 10.0
            g[pre + "boxes"][i], g[pre + "logits"][i] = boxes, logits
    return store


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fake detector's caches of one tiny COCO folder, with and without the flipped view."""
    fd.register()
    root = tmp_path_factory.mktemp("flipviews")
    coco = root / "coco"
    fd.make_coco(coco, n=5, split="train2017")
    fd.make_coco(coco, n=3, split="val2017", seed=1)
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    ann = coco / "annotations" / "instances_train2017.json"
    return {
        "root": root,
        "coco": coco,
        "ckpt": ckpt,
        "flip": _cache(coco, "train2017", root / "flip", ckpt, views=VIEWS),
        "orig": _cache(coco, "train2017", root / "orig", ckpt),
        "val": _cache(coco, "val2017", root / "val", ckpt),
        "val_flip": _cache(coco, "val2017", root / "val_flip", ckpt, views=VIEWS),
        "flip_oracle": _oracle(_cache(coco, "train2017", root / "flip_o", ckpt, views=VIEWS), ann),
        "orig_oracle": _oracle(_cache(coco, "train2017", root / "orig_o", ckpt), ann),
    }


def _flipped_copy(coco: Path, split: str, out: Path) -> Path:
    """The same split with every image mirrored (decoded pixels flipped, stored losslessly)."""
    (out / split).mkdir(parents=True)
    (out / "annotations").mkdir()
    shutil.copy(coco / "annotations" / f"instances_{split}.json", out / "annotations" / f"instances_{split}.json")
    for p in (coco / split).iterdir():
        with Image.open(p) as im:
            Image.fromarray(np.asarray(im.convert("RGB"))[:, ::-1].copy()).save(out / split / p.name, format="PNG")
    return out


def test_hflip_view_is_the_demo_detector_run_on_the_flipped_image(tmp_path: Path) -> None:
    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.detectors.registry import get_preset
    from mfdetr.engine.inference.predict import detector_checkpoint

    ckpt = detector_checkpoint(get_preset("demo"), None)
    coco = tmp_path / "synth"
    generate_synth(coco, config=SynthConfig(train=3, val=1, image_size=160, seed=3))
    flipped = _cache(
        _flipped_copy(coco, "train2017", tmp_path / "flipped"),
        "train2017",
        tmp_path / "fl",
        ckpt,
        detector="demo",
        enc_layers=(2,),
    )
    both = _cache(coco, "train2017", tmp_path / "both", ckpt, detector="demo", views=VIEWS, enc_layers=(2,))
    s = CacheStore.open(both)
    assert s.views == list(VIEWS) and s.manifest["views"] == list(VIEWS)
    ref = CacheStore.open(flipped)
    for i in range(len(s)):
        h, _ = s.for_view("hflip").read(i)
        r, _ = ref.read(i)
        o, _ = s.read(i)
        # the stored flipped view is the detector's own output on the flipped image
        for name in ("queries", "boxes", "logits", "c1"):
            torch.testing.assert_close(getattr(h, name), getattr(r, name), rtol=1e-3, atol=2e-3)
        torch.testing.assert_close(h.enc_maps[2][0], r.enc_maps[2][0], rtol=1e-3, atol=2e-3)
        # ... a second run, not the original's features mirrored
        assert (h.enc_maps[2][0].float() - o.enc_maps[2][0].float().flip(-1)).abs().max() > 0.05
        assert (h.c1.float() - o.c1.float().flip(-1)).abs().max() > 0.05
        # its boxes are in the flipped frame: the top box mirrors one of the original's
        cx = 1.0 - h.boxes[0, 0, 0]
        assert (o.boxes[0, :, 0] - cx).abs().min() < 0.02


def test_flipped_gt_matches_the_flipped_image(fake: dict[str, Path]) -> None:
    from mfdetr.data import CocoInstances

    ds = CocoInstances(fake["coco"], "train2017", with_targets=True)
    checked = 0
    for image_id in ds.image_ids:
        t = ds.load_targets(image_id)
        f = hflip_instances(t)
        back = hflip_instances(f)
        assert torch.equal(back.masks, t.masks) and torch.equal(back.boxes, t.boxes)
        with Image.open(ds.image_path(image_id)) as im:
            px = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32))
        flipped_px = px.flip(1)
        for k in range(len(t)):
            if not t.masks[k].any():
                continue
            # the flipped mask covers the flipped image's pixels of the object, and its box fits it tightly
            torch.testing.assert_close(flipped_px[f.masks[k]].mean(0), px[t.masks[k]].mean(0))
            torch.testing.assert_close(masks_to_boxes_xyxy(f.masks[k : k + 1])[0], f.boxes[k])
            checked += 1
    assert checked > 0


def test_training_items_pair_the_view_with_its_gt(fake: dict[str, Path]) -> None:
    store = CacheStore.open(fake["flip"])
    coco = open_annotations(store, coco=fake["coco"])
    ds = ViewSampledDataset(views=store.views, seed=5, store=store, coco_split=coco, enc_layer=4)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            view = ds.view_of(i)
            seen.add(view)
            det, gt = ds[i]
            want, image_id = store.for_view(view).read(int(ds.indices[i]), enc_layers=[4])
            assert torch.equal(det.boxes, want.boxes) and torch.equal(det.queries, want.queries)
            t = coco.load_targets(image_id)
            assert torch.equal(gt.masks, t.masks.flip(-1) if view == "hflip" else t.masks)
    assert seen == set(VIEWS)


def test_view_choice_is_seeded_per_epoch() -> None:
    def draws(seed: int, epoch: int) -> list[str]:
        return [choose_view(seed, epoch, i, VIEWS) for i in range(64)]

    assert draws(0, 0) == draws(0, 0)
    assert draws(0, 0) != draws(0, 1) and draws(0, 0) != draws(1, 0)
    assert 16 < draws(0, 0).count("hflip") < 48
    assert choose_view(0, 3, 7, ("orig",)) == "orig"


def _train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]


def test_resumed_run_reads_the_same_views(fake: dict[str, Path], tmp_path: Path) -> None:
    """5 images, batch 2: 3 steps per epoch, so the resume at step 3 starts epoch 1 (a fresh draw)."""
    src = CacheSources(cache=fake["flip_oracle"], coco=fake["coco"])
    cfg = build_run_config(tiny_cfg(iterations=6, checkpoint_every=3, keep_checkpoints=True))
    full = tmp_path / "full"
    train_from_cache(cfg, src, full)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "ckpt_0000003.pt", cut / "ckpt.pt")
    shutil.copy(full / "config.json", cut / "config.json")
    recs = [r for r in read_jsonl(full / "metrics.jsonl") if r["step"] <= 3]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    train_from_cache(replace_train(cfg, num_workers=1), src, cut, resume=True)
    assert _train_losses(full) == _train_losses(cut) and len(_train_losses(full)) == 6
    assert all(loss > 0 for _, loss in _train_losses(full))
    # the views matter: the first epoch on the original view alone trains on other data
    assert "hflip" in [choose_view(cfg.train.seed, 0, i, VIEWS) for i in range(5)]
    only = tmp_path / "orig"
    train_from_cache(replace_train(cfg, iterations=3), CacheSources(cache=fake["orig_oracle"], coco=fake["coco"]), only)
    assert _train_losses(only) != _train_losses(full)[:3]


def test_eval_reads_the_original_view_only(fake: dict[str, Path], tmp_path: Path) -> None:
    cfg = build_run_config(tiny_cfg(iterations=2))
    run = tmp_path / "run"
    train_from_cache(cfg, CacheSources(cache=fake["orig"], coco=fake["coco"]), run)
    plain = eval_from_cache(CacheSources(cache=fake["val"], coco=fake["coco"]), checkpoint=run / "ckpt.pt")
    # the flipped view's data is never read: even with its arrays gone the numbers are the same
    damaged = tmp_path / "val_flip"
    shutil.copytree(fake["val_flip"], damaged)
    for arr in damaged.iterdir():
        if arr.name.startswith("hflip_") and arr.name != "hflip_commit":
            shutil.rmtree(arr / "c", ignore_errors=True)
    flip = eval_from_cache(CacheSources(cache=damaged, coco=fake["coco"]), checkpoint=run / "ckpt.pt")
    assert flip == plain


def test_cache_without_views_reads_as_the_original_view(fake: dict[str, Path], tmp_path: Path) -> None:
    s = CacheStore.open(fake["orig"])
    assert "views" not in s.manifest and s.views == ["orig"]
    assert not any(a.startswith("hflip_") for a in s.manifest["arrays"])
    with pytest.raises(MfdetrError, match="not 'hflip'"):
        s.for_view("hflip")
    ds = CacheDataset(store=s, coco_split=open_annotations(s, coco=fake["coco"]), enc_layer=4)
    assert not hasattr(ds, "set_epoch") and ds.view_of(0) == "orig"
    # the original view of a flip store is exactly the store without views
    f = CacheStore.open(fake["flip"])
    for i in range(len(s)):
        a, _ = s.read(i)
        b, _ = f.read(i)
        assert torch.equal(a.queries, b.queries) and torch.equal(a.enc_maps[4][0], b.enc_maps[4][0])


def test_inspect_dry_run_and_repair_count_views(fake: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "flip"
    shutil.copytree(fake["flip"], store)
    _, plain = inspect_store(fake["orig"])
    _, both = inspect_store(store, verify=True)
    assert both["done"] == 5 and both["damaged"] == 0 and both["views"]["hflip"]["done"] == 5
    per_image = {n: sum(a["stored_bytes"] for a in f["arrays"].values()) for n, f in (("p", plain), ("b", both))}
    assert 1.8 < per_image["b"] / per_image["p"] < 2.2
    # the dry run's estimate doubles
    est = {}
    for name, views in (("p", ("orig",)), ("b", VIEWS)):
        job = CacheJob(
            detector=fd.NAME,
            checkpoint=fake["ckpt"],
            coco=fake["coco"],
            split="train2017",
            out=tmp_path / f"new_{name}",
            topk=8,
            enc_layers=(4,),
            views=views,
        )
        est[name] = run_cache(job, dry_run=True, echo=lambda *a: None).estimate
    assert est["b"]["bytes_per_image"] == pytest.approx(2 * est["p"]["bytes_per_image"])
    # a lost chunk of the flipped view: found by inspect, recomputed by a plain rerun
    (store / "hflip_queries" / "c" / "2" / "0" / "0").unlink()
    _, hurt = inspect_store(store)
    assert hurt["damaged"] == 1 and hurt["views"]["hflip"]["damaged"] == 1 and hurt["views"]["orig"]["damaged"] == 0
    assert "hflip_queries" in hurt["damage"][0].describe()
    _cache(fake["coco"], "train2017", store, fake["ckpt"], views=VIEWS)
    _, fixed = inspect_store(store, verify=True)
    assert fixed["damaged"] == 0 and fixed["done"] == 5
    fd.assert_same_store(store, fake["flip"])


def test_views_option_manifest_and_commit_combination(fake: dict[str, Path]) -> None:
    assert parse_views("orig,hflip") == VIEWS and parse_views("hflip,orig") == VIEWS
    assert parse_views("orig") == ("orig",) and parse_views(None) == ("orig",)
    for bad in ("hflip", "orig,vflip", "orig,orig", ""):
        with pytest.raises(MfdetrError, match="--views"):
            parse_views(bad)
    # a manifest's views: the schema and the order rules
    from mfdetr.cache.manifest import validate_manifest_data

    m = CacheStore.open(fake["flip"]).manifest
    assert validate_manifest_data(m) == []
    for bad in (["hflip", "orig"], ["orig", "orig"], ["orig", "vflip"], ["orig"]):
        assert any("views" in e for e in validate_manifest_data({**m, "views": bad})), bad
    a = np.array([1, 1, 2, 0, 1, 255], dtype=np.uint8)
    b = np.array([1, 0, 2, 1, 2, 1], dtype=np.uint8)
    assert combined_commit([a, b]).tolist() == [1, 0, 2, 0, 2, 255]


def test_cache_cli_refuses_bad_views(fake: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import cli

    r = cli(
        "cache",
        "--detector",
        fd.NAME,
        "--checkpoint",
        fake["ckpt"],
        "--coco",
        fake["coco"],
        "--split",
        "train2017",
        "--out",
        tmp_path / "x",
        "--views",
        "orig,sideways",
    )
    assert r.returncode != 0 and "--views" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_recompute_cache_recomputes_c1_of_the_flipped_image(tmp_path: Path) -> None:
    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.engine.collate import collate_detector_outputs
    from tests._tiny_detector import NAME as TINY
    from tests._tiny_detector import save_detector_checkpoint

    synth = tmp_path / "synth"
    generate_synth(synth, config=SynthConfig(train=3, val=1, image_size=40, seed=40))
    ckpt = save_detector_checkpoint(tmp_path / "tiny.pth")
    stored, recomp = (
        CacheStore.open(_cache(synth, "train2017", tmp_path / m, ckpt, detector=TINY, views=VIEWS, c1=m))
        for m in ("store", "recompute")
    )
    ds = ViewSampledDataset(
        views=VIEWS, seed=0, store=recomp, coco_split=open_annotations(recomp, coco=None), enc_layer=4
    )
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            view = ds.view_of(i)
            seen.add(view)
            got = ds.prepare_batch(collate_detector_outputs([ds[i]]), "cpu").det.c1
            want, _ = stored.for_view(view).read(int(ds.indices[i]), enc_layers=[4])
            assert torch.equal(got, want.c1)  # C1 of the flipped image, as --c1 store stores it
    assert seen == set(VIEWS)


def test_demo_cli_refuses_bad_views(tmp_path: Path) -> None:
    from tests.conftest import cli

    r = cli("demo", "--out", tmp_path / "d", "--views", "orig,upside-down", "--quick")
    assert r.returncode != 0 and "--views" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()
