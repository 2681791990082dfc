"""The synthetic COCO-format dataset: determinism, content properties, COCO consistency, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfdetr.contracts import Preprocessing
from mfdetr.data import CocoInstances
from mfdetr.data.synth import SynthConfig, generate_synth, render_scene
from mfdetr.data.synth_render import SYNTH_CLASSES, render_object
from mfdetr.evaluation import load_coco_gt
from tests.conftest import assert_user_error, cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2

CFG = SynthConfig(train=40, val=6, image_size=64, seed=3)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "coco"
    generate_synth(out, config=CFG)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(synth_dir, tmp_path):
    again = tmp_path / "again"
    generate_synth(again, config=CFG)
    a, b = _files(synth_dir), _files(again)
    assert a.keys() == b.keys() and len(a) == 40 + 6 + 2
    assert all(a[k] == b[k] for k in a)  # byte-identical JSON and JPEGs
    other = tmp_path / "other"
    generate_synth(other, config=SynthConfig(train=2, val=1, image_size=64, seed=4))
    assert _files(other)["train2017/000000000001.jpg"] != a["train2017/000000000001.jpg"]
    # image i of a split does not depend on how many images the other split has
    fewer = tmp_path / "fewer"
    generate_synth(fewer, config=SynthConfig(train=2, val=0, image_size=64, seed=3))
    assert _files(fewer)["train2017/000000000002.jpg"] == a["train2017/000000000002.jpg"]


def test_layout_and_coco_consistency(synth_dir):
    for split, n in (("train2017", 40), ("val2017", 6)):
        ann = synth_dir / "annotations" / f"instances_{split}.json"
        gt = load_coco_gt(ann)
        assert len(gt.imgs) == n and len(list((synth_dir / split).glob("*.jpg"))) == n
        assert len(gt.cats) >= 5 and len({c["name"] for c in gt.cats.values()}) == len(gt.cats)
        for img in gt.imgs.values():
            with Image.open(synth_dir / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.format == "JPEG"
            assert min(img["height"], img["width"]) == 64
            union = np.zeros((img["height"], img["width"]), dtype=np.int32)
            for a in gt.imgToAnns[img["id"]]:
                m = gt.annToMask(a).astype(bool)
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert a["area"] == int(m.sum()) >= CFG.min_area
                if a["iscrowd"]:
                    assert isinstance(a["segmentation"]["counts"], list)  # uncompressed RLE, like COCO
                union += m
            assert union.max() <= 1  # visible parts never overlap (painter's order)


def test_dataset_contents(synth_dir):
    gt = load_coco_gt(synth_dir / "annotations" / "instances_train2017.json")
    anns = list(gt.anns.values())
    areas = np.array([a["area"] for a in anns if not a["iscrowd"]])
    assert (areas < 32**2 * (64 / 160) ** 2).any() and (areas > 96**2 * (64 / 160) ** 2).any()
    assert any(a["iscrowd"] for a in anns) and any(not gt.imgToAnns[i] for i in gt.imgs)
    assert {a["category_id"] for a in anns} == {c.id for c in SYNTH_CLASSES}
    assert sum(isinstance(a["segmentation"], list) for a in anns) > 0.8 * len(anns)  # mostly polygons

    def on_border(a):
        x, y, w, h = a["bbox"]
        img = gt.imgs[a["image_id"]]
        return x == 0 or y == 0 or x + w == img["width"] or y + h == img["height"]

    assert 0 < sum(map(on_border, anns)) < len(anns)
    sizes = {(im["height"], im["width"]) for im in gt.imgs.values()}
    assert len(sizes) > 2  # aspect ratios vary (batch padding gets exercised)


def test_occlusion_keeps_visible_parts_only():
    # find a scene where a later instance hides part of an earlier one
    for i in range(30):
        rng = np.random.default_rng([0, 0, i])
        _, instances = render_scene(SynthConfig(image_size=64), rng)
        if len(instances) >= 2:
            masks = np.stack([x.mask for x in instances])
            assert masks.sum(0).max() <= 1
            break
    else:
        pytest.fail("no multi-object scene in 30 draws")


def test_classes_differ_in_shape_and_texture():
    masks, stds = [], []
    for cls in SYNTH_CLASSES:
        out = render_object(
            cls, cx=32, cy=32, a=24, aspect=1.0, angle=0.3, height=64, width=64, rng=np.random.default_rng(0)
        )
        assert out is not None
        rows, cols, m, rgb = out
        full = np.zeros((64, 64), dtype=bool)
        full[rows, cols] = m
        masks.append(full)
        stds.append(float(rgb[m].std(axis=0).max()))
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (SYNTH_CLASSES[i].name, SYNTH_CLASSES[j].name, iou)
    assert min(stds) > 5.0  # textured, not one flat colour


def test_dataset_reads_synth_and_masks_match_coco(synth_dir):
    ds = CocoInstances(synth_dir, "val2017", preprocessing=Preprocessing(short_side=32, max_size=48))
    gt = load_coco_gt(ds.annotation_file)
    for i in range(len(ds)):
        item = ds[i]
        t = item.target
        anns = [a for a in gt.imgToAnns[item.image_id]]
        assert len(t) == len(anns)
        for k, a in enumerate(anns):
            assert torch.equal(t.masks[k], torch.from_numpy(gt.annToMask(a).astype(bool)))
            x, y, w, h = a["bbox"]
            assert t.boxes[k].tolist() == [x, y, x + w, y + h] and bool(t.iscrowd[k]) == bool(a["iscrowd"])
        assert min(item.input_hw) == 32


def test_synth_cli_and_overwrite(tmp_path):
    out = tmp_path / "s"
    proc = cli("synth", "--out", out, "--train", "3", "--val", "2", "--image-size", "48", "--seed", "1", check=True)
    assert "train2017: 3 images" in proc.stdout
    data = json.loads((out / "annotations" / "instances_val2017.json").read_text())
    assert len(data["images"]) == 2
    assert_user_error(cli("synth", "--out", out, "--train", "2"), str(out), "not empty", "--force")
    cli("synth", "--out", out, "--train", "2", "--val", "1", "--image-size", "48", "--force", check=True)
    assert len(list((out / "train2017").iterdir())) == 2 and len(list((out / "val2017").iterdir())) == 1
    assert_user_error(cli("synth", "--out", tmp_path / "z", "--train", "0", "--val", "0"), "at least one image")


def test_batches_over_synth_pad_varied_sizes(synth_dir):
    from mfdetr.data import iterate_batches

    ds = CocoInstances(
        synth_dir, "train2017", preprocessing=Preprocessing(short_side=32, max_size=64), with_targets=False
    )
    seen = 0
    for batch, skips in iterate_batches(ds, batch_size=8, indices=range(16)):
        assert not skips and batch is not None and batch.targets is None
        hp, wp = batch.images.shape[-2:]
        assert (hp, wp) == tuple(batch.input_hw.max(0).values.tolist())
        for i, (h, w) in enumerate(batch.input_hw.tolist()):
            assert int((~batch.pad_mask[i]).sum()) == h * w and not batch.pad_mask[i, :h, :w].any()
        seen += len(batch)
    assert seen == 16
