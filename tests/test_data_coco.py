"""COCO dataset, eval preprocessing and batching."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mfdetr.contracts import Preprocessing
from mfdetr.data import (
    CocoInstances,
    EvalTransform,
    SkipRecord,
    collate,
    iterate_batches,
    load_rgb,
    mask_to_rle,
    masks_to_boxes_xyxy,
    resized_hw,
    segmentation_to_rle,
)
from mfdetr.errors import MfdetrError, SkipImage
from tests._data_helpers import make_tiny_coco, rgb_array, square_polygon, write_coco

PRE = Preprocessing(short_side=16, max_size=40)


# (h, w, S, M) -> official Deformable-DETR get_size_with_aspect_ratio result, worked by hand.
@pytest.mark.parametrize(
    "h,w,s,m,expected",
    [
        (480, 640, 800, 1333, (800, 1066)),  # int() truncates 1066.67
        (427, 640, 800, 1333, (800, 1199)),
        (800, 600, 800, 1333, (1066, 800)),  # portrait
        (800, 1200, 800, 1333, (800, 1200)),  # shorter side already S: unchanged
        (100, 1000, 800, 1333, (133, 1330)),  # capped by M: S' = round(133.3) = 133, long = int(1330.0)
        (2, 4, 800, 1333, (666, 1332)),  # round(666.5) = 666 (round-half-even, as Python's round)
        (333, 500, 160, 1333, (160, 240)),
        (30, 40, 16, 40, (16, 21)),
    ],
)
def test_resized_hw_matches_official_rule(h, w, s, m, expected):
    assert resized_hw(h, w, s, m) == expected


def test_eval_transform_size_and_normalisation():
    img = Image.fromarray(np.full((30, 40, 3), 255, dtype=np.uint8))
    x = EvalTransform(preprocessing=PRE)(img)
    assert x.shape == (3, 16, 21) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(PRE.mean)) / torch.tensor(PRE.std)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)


@pytest.mark.parametrize("hw", [(30, 40), (37, 23), (16, 50)])
def test_eval_transform_equals_torchvision_composition(hw):
    """Same numbers as the official val transform built from torchvision calls on the PIL image."""
    import torchvision.transforms.functional as TF

    img = Image.fromarray(rgb_array(*hw, seed=5))
    size = resized_hw(*hw, PRE.short_side, PRE.max_size)
    ref = TF.normalize(TF.to_tensor(TF.resize(img, list(size))), list(PRE.mean), list(PRE.std))
    assert torch.allclose(EvalTransform(preprocessing=PRE)(img), ref, atol=1e-6)


def test_dataset_items_and_targets(tmp_path):
    ann = make_tiny_coco(tmp_path)
    ds = CocoInstances(tmp_path, "val2017", preprocessing=PRE)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3] and ds.category_ids == [1, 3]
    assert ds.file_name(2) == "b.png" and ds.annotation_file == ann
    assert len(ds.annotation_sha256) == 64
    it = ds[0]
    assert it.image.shape == (3, 16, 21) and it.input_hw == (16, 21) and it.orig_hw == (30, 40)
    t = it.target
    assert t is not None and len(t) == 2  # two degenerate annotations ignored
    assert t.labels.tolist() == [1, 3] and t.iscrowd.tolist() == [False, True]
    assert t.masks.shape == (2, 30, 40) and t.masks.dtype == torch.bool
    assert t.boxes.tolist()[1] == [25.0, 20.0, 39.0, 28.0]  # crowd RLE decoded at the right place
    assert int(t.masks[1].sum()) == 8 * 14
    # grayscale PNG → 3 channels, identical channels before normalisation
    g = ds[1]
    raw = g.image * torch.tensor(PRE.std).view(3, 1, 1) + torch.tensor(PRE.mean).view(3, 1, 1)
    assert g.image.shape[0] == 3 and torch.allclose(raw[0], raw[1], atol=1e-5)
    assert ds[2].target is not None and len(ds[2].target) == 0
    assert ds[2].target.masks.shape == (0, 30, 40)
    no_t = CocoInstances(tmp_path, "val2017", preprocessing=PRE, with_targets=False)
    assert no_t[0].target is None


def test_collate_pads_bottom_right(tmp_path):
    make_tiny_coco(tmp_path)
    ds = CocoInstances(tmp_path, "val2017", preprocessing=Preprocessing(short_side=16, max_size=40))
    a, b = ds[0], ds[1]
    b.image = b.image[:, :12, :18]
    b.input_hw = (12, 18)
    batch = collate([a, b])
    assert batch.images.shape == (2, 3, 16, 21)
    assert batch.input_hw.tolist() == [[16, 21], [12, 18]] and batch.orig_hw.tolist() == [[30, 40], [30, 40]]
    assert not batch.pad_mask[0].any()
    assert batch.pad_mask[1, 12:].all() and batch.pad_mask[1, :, 18:].all() and not batch.pad_mask[1, :12, :18].any()
    assert (batch.images[1, :, 12:] == 0).all() and torch.equal(batch.images[1, :, :12, :18], b.image)
    assert batch.image_ids == [1, 2] and batch.file_names == ["a.jpg", "b.png"] and len(batch.targets) == 2
    assert collate([a], size_divisibility=32).images.shape[-2:] == (32, 32)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "P+transparency", "RGBA", "LA", "I;16", "I", "1"])
def test_image_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(rgb_array(8, 10, 4))
    if mode == "I;16":
        img = Image.fromarray((np.arange(80, dtype=np.uint16).reshape(8, 10) * 800))
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray((np.arange(80, dtype=np.int32).reshape(8, 10) * 800))
    elif mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 0
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I') else 'png'}"
    img.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (10, 8)
    a = np.asarray(out)
    if mode in ("I;16", "I"):  # 16-bit scaled to 8 bits: 63200 → 246, 0 → 0
        assert a[0, 0, 0] == 0 and a[7, 9, 0] == round(79 * 800 / 257) and (a[..., 0] == a[..., 2]).all()
    x = EvalTransform(preprocessing=PRE)(out)
    assert x.shape[0] == 3


def test_bad_images_become_recorded_skips(tmp_path):
    make_tiny_coco(tmp_path)
    d = tmp_path / "val2017"
    (d / "b.png").unlink()  # missing file
    good = (d / "a.jpg").read_bytes()
    (d / "c.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    ds = CocoInstances(tmp_path, "val2017", preprocessing=PRE)
    with pytest.raises(SkipImage, match="missing image file"):
        ds[1]
    with pytest.raises(SkipImage, match="truncated|corrupt"):
        ds[2]
    (d / "c.jpg").write_bytes(b"not a jpeg at all")
    out = list(iterate_batches(ds, batch_size=2))
    assert len(out) == 2
    (b0, s0), (b1, s1) = out
    assert b0 is not None and b0.image_ids == [1] and [s.image_id for s in s0] == [2]
    assert b1 is None and isinstance(s1[0], SkipRecord) and s1[0].file_name == "c.jpg"
    assert "corrupt" in s1[0].reason and s1[0].to_dict()["index"] == 2
    # the same through a worker process (items and skip records cross the process boundary)
    par = list(iterate_batches(ds, batch_size=2, num_workers=1))
    assert [[s.image_id for s in sk] for _, sk in par] == [[2], [3]]
    assert torch.equal(par[0][0].images, b0.images) and len(par[0][0].targets[0]) == 2


def test_wrong_image_size_is_a_skip(tmp_path):
    make_tiny_coco(tmp_path)
    Image.fromarray(rgb_array(31, 40)).save(tmp_path / "val2017" / "c.jpg")
    with pytest.raises(SkipImage, match="annotation file says 40x30"):
        CocoInstances(tmp_path, "val2017", preprocessing=PRE)[2]


def _mutate(tmp_path, fn):
    ann = make_tiny_coco(tmp_path)
    data = json.loads(ann.read_text())
    fn(data)
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99"),
        (lambda d: d["annotations"][1].update(category_id=7), "unknown category id 7"),
        (lambda d: d.update(images=[], annotations=[]), "empty split"),
        (lambda d: d.pop("categories"), "no 'categories' list"),
        (lambda d: d["images"][0].pop("height"), "height"),
    ],
)
def test_bad_annotation_files(tmp_path, mutate, needle):
    ann = _mutate(tmp_path, mutate)
    with pytest.raises(MfdetrError, match=needle) as e:
        CocoInstances(tmp_path, "val2017")
    assert str(ann) in str(e.value)


def test_bad_layouts(tmp_path):
    with pytest.raises(MfdetrError, match="COCO folder not found"):
        CocoInstances(tmp_path / "nope", "val2017")
    make_tiny_coco(tmp_path)
    with pytest.raises(MfdetrError, match="split folder not found"):
        CocoInstances(tmp_path, "train2017")
    (tmp_path / "train2017").mkdir()
    with pytest.raises(MfdetrError, match="annotation file not found"):
        CocoInstances(tmp_path, "train2017")
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{ not json")
    with pytest.raises(MfdetrError, match="malformed annotations JSON"):
        CocoInstances(tmp_path, "val2017")


def test_mask_helpers_roundtrip():
    m = torch.zeros(2, 6, 7, dtype=torch.bool)
    m[0, 1:4, 2:6] = True
    rles = mask_to_rle(m)
    assert isinstance(rles, list) and isinstance(rles[0]["counts"], str) and rles[0]["size"] == [6, 7]
    back = segmentation_to_rle(rles[0], 6, 7)
    from mfdetr.data import decode_rle

    assert np.array_equal(decode_rle(back), m[0].numpy())
    assert masks_to_boxes_xyxy(m).tolist() == [[2.0, 1.0, 6.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    assert segmentation_to_rle([[1, 1, 2, 2]], 6, 7) is None  # < 3 points
    assert segmentation_to_rle([[1, 1, 2, 2, math.nan, 3]], 6, 7) is None
    assert segmentation_to_rle({"size": [5, 7], "counts": rles[0]["counts"]}, 6, 7) is None  # wrong size
    assert segmentation_to_rle([square_polygon(1, 1, 4, 4), [0, 0]], 6, 7) is not None  # good + bad polygon


def test_unknown_category_in_second_split_names_file(tmp_path):
    make_tiny_coco(tmp_path)
    write_coco(
        tmp_path,
        "train2017",
        [{"id": 1, "file_name": "a.jpg", "height": 3, "width": 3}],
        [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [], "bbox": [0, 0, 1, 1]}],
    )
    with pytest.raises(MfdetrError, match="instances_train2017.json: annotations\\[0\\] points at unknown category"):
        CocoInstances(tmp_path, "train2017")
