"""Reading several cache images at once: the same data as one at a time, damage kept per image."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tests._fake_detector as fd
from mfdetr.cache import CacheStore
from mfdetr.cache.verify import DamagedImage
from mfdetr.contracts import DetectorOutput
from mfdetr.engine.cache_data import CacheDataset, _kept_bytes, open_annotations
from mfdetr.engine.damage import DamagedItem
from mfdetr.errors import MfdetrError
from tests.conftest import cli

N = 6


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("read_many")
    coco = root / "coco"
    fd.make_coco(coco, n=N)
    fd.save_fake_checkpoint(coco / "fake.pth")
    store = root / "store"
    p = cli(*fd.cache_args(coco, store, "--no-progress"))
    assert p.returncode == 0, p.stderr
    return {"coco": coco, "store": store}


def same_output(a: DetectorOutput, b: DetectorOutput) -> None:
    for name in ("queries", "boxes", "logits", "c1", "input_hw", "orig_hw", "level_valid_hw"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert sorted(a.enc_maps) == sorted(b.enc_maps)
    for layer, maps in a.enc_maps.items():
        assert all(torch.equal(x, y) for x, y in zip(maps, b.enc_maps[layer], strict=True)), layer


def test_read_many_equals_reading_one_at_a_time(made: dict[str, Path]) -> None:
    store = CacheStore.open(made["store"])
    order = [3, 0, 5, 1, 1, 4, 2]  # any order, repeats allowed
    for crop in (True, False):
        for layers in (None, [6]):
            got = store.read_many(order, enc_layers=layers, crop=crop)
            assert len(got) == len(order)
            for index, res in zip(order, got, strict=True):
                assert not isinstance(res, MfdetrError)
                det, iid = res
                want, want_id = store.read(index, enc_layers=layers, crop=crop)
                assert iid == want_id == int(store.image_ids[index])
                same_output(det, want)
    assert store.read_many([]) == []
    with pytest.raises(IndexError):
        store.read_many([0, N])
    with pytest.raises(MfdetrError, match=r"layers \[5\]"):
        store.read_many([0], enc_layers=[5])


@pytest.mark.parametrize("kind", ["missing_shard", "truncated", "flipped", "nan", "bad_size"])
def test_a_damaged_image_is_its_own_error_the_others_read(made: dict[str, Path], tmp_path: Path, kind: str) -> None:
    path = tmp_path / "store"
    shutil.copytree(made["store"], path)
    iid = fd.damage(path, kind)
    index, array = fd.KINDS[kind]
    store, intact = CacheStore.open(path), CacheStore.open(made["store"])
    got = store.read_many(list(range(N)))
    for i, res in enumerate(got):
        if i == index:
            assert isinstance(res, DamagedImage) and res.damage is not None
            assert (res.damage.image_id, res.damage.array) == (iid, array)
            with pytest.raises(DamagedImage, match=f"image id {iid}"):
                store.read(i)
        else:
            assert not isinstance(res, MfdetrError), res
            same_output(res[0], intact.read(i)[0])


def items_equal(a: object, b: object) -> None:
    if isinstance(a, DamagedItem):
        assert isinstance(b, DamagedItem) and a.damage == b.damage
        return
    (da, ga), (db, gb) = a, b  # type: ignore[misc]
    same_output(da, db)
    assert da.extras == db.extras
    assert ga.image_id == gb.image_id and torch.equal(ga.masks, gb.masks) and torch.equal(ga.labels, gb.labels)


@pytest.mark.parametrize("on_damaged", ["substitute", "mark", "raise"])
def test_dataset_batch_read_equals_item_reads(made: dict[str, Path], tmp_path: Path, on_damaged: str) -> None:
    path = tmp_path / "store"
    shutil.copytree(made["store"], path)
    fd.damage(path, "truncated")  # image index 3: found only when decoded
    store = CacheStore.open(path)
    ds = CacheDataset(
        store=store, coco_split=open_annotations(store, coco=made["coco"]), enc_layer=4, on_damaged=on_damaged
    )
    items = [5, 3, 0, 3, 2]
    if on_damaged == "raise":
        with pytest.raises(DamagedImage, match="array 'c1'"):
            ds.__getitems__(items)
        assert len(ds.__getitems__([0, 1, 2])) == 3
        return
    got = ds.__getitems__(items)
    for i, item in zip(items, got, strict=True):
        items_equal(item, ds[i])
    if on_damaged == "substitute":  # the next intact image stands in, the damage noted with it
        det, gt = got[1]
        assert gt.image_id == int(store.image_ids[4]) and len(det.extras["damaged"]) == 1
    else:
        assert isinstance(got[1], DamagedItem)


def test_images_kept_in_memory_read_like_the_store(made: dict[str, Path], tmp_path: Path) -> None:
    """A dataset that keeps its reads in memory gives the same items, keeps within its budget, hands out
    containers of its own (an item's extras never reach what is kept) and keeps nothing of a damaged read."""
    path = tmp_path / "store"
    shutil.copytree(made["store"], path)
    fd.damage(path, "truncated")  # image index 3
    store = CacheStore.open(path)
    coco = open_annotations(store, coco=made["coco"])
    plain = CacheDataset(store=store, coco_split=coco, enc_layer=4, on_damaged="substitute")
    size = _kept_size(CacheDataset(store=store, coco_split=coco, enc_layer=4, memory_bytes=1 << 30), [5, 0])
    for budget, kept in ((1 << 30, range(N - 1, N)), (size, range(1, N - 1)), (1, range(1))):
        ds = CacheDataset(store=store, coco_split=coco, enc_layer=4, on_damaged="substitute", memory_bytes=budget)
        for _ in range(2):  # first read from the store, then from memory where kept
            got = ds.__getitems__([5, 3, 0, 1, 0])  # a repeat within the batch is kept once
            for i, item in zip([5, 3, 0, 1, 0], got, strict=True):
                items_equal(item, plain[i])
                item[0].extras["image_id"].append(-1)  # what the training loop may do to its item
                item[0].enc_maps.clear()
            for i in range(N):
                items_equal(ds[i], plain[i])
        assert len(ds._kept) in kept and ds._kept_bytes <= budget
        assert ds._kept_bytes == sum(_kept_bytes(k.det, k.target) for k in ds._kept.values())
        assert all(k[1] != 3 for k in ds._kept)
    import pickle

    assert pickle.loads(pickle.dumps(ds))._kept == {}  # a DataLoader worker keeps its own


def _kept_size(ds: CacheDataset, items: list[int]) -> int:
    ds.__getitems__(items)
    return ds._kept_bytes
