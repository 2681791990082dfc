"""Cache store v1 in-process: round trip, canvas padding, validation, creation races, skips, errors."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import tests._fake_detector as fd
from tests._fake_detector import assert_same_store, read_all
from mfdetr.cache import (
    COMMIT_DONE,
    COMMIT_PENDING,
    COMMIT_SKIPPED,
    BackgroundWriter,
    CacheJob,
    CacheStore,
    CacheWriter,
    build_manifest,
    records_from_output,
    run_cache,
)
from mfdetr.cache.store import open_for_writing, read_commit_flags
from mfdetr.contracts import ImageBatch
from mfdetr.detectors.registry import list_detectors, unregister_detector
from mfdetr.errors import MfdetrError


@pytest.fixture
def fake():
    """The fake detector, registered for the test; the registry is left as the test found it (importing
    ``tests._fake_detector`` registers it for every module that uses it)."""
    was = fd.NAME in list_detectors()
    fd.register()
    yield fd.build_fake(checkpoint=fd.fake_state_dict(0))
    if not was:
        unregister_detector(fd.NAME)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    fd.make_coco(root, n=7, corrupt=[5])
    fd.save_fake_checkpoint(root / "fake.pth")
    return root


def job(coco: Path, out: Path, **kw) -> CacheJob:
    base = dict(
        detector=fd.NAME,
        checkpoint=coco / "fake.pth",
        coco=coco,
        split="val2017",
        out=out,
        topk=8,
        enc_layers=(4, 6),
        batch_size=2,
        num_workers=0,
        writer_threads=2,
    )
    base.update(kw)
    return CacheJob(**base)


def batch_of(coco: Path, ids: list[int]) -> ImageBatch:
    from mfdetr.data import CocoInstances, collate

    ds = CocoInstances(coco, "val2017", preprocessing=fd.PRESET.preprocessing, with_targets=False)
    return collate([ds[ds.index_of(i)] for i in ids])


def test_round_trip_values_padding_and_layers(tmp_path, coco, fake):
    summary = run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None)
    assert summary.store_done == 6 and summary.store_skipped == 1 and summary.store_pending == 0
    store = CacheStore.open(tmp_path / "s", expect={"detector.name": fd.NAME, "enc_layers": [6]})
    assert store.complete_indices().tolist() == [0, 1, 2, 3, 5, 6]
    [(idx, iid, reason)] = store.skipped()
    assert (idx, iid) == (4, 5) and "000005.png" in reason
    # the fast commit scan agrees with zarr and ignores a killed writer's temporary file
    (tmp_path / "s" / "commit" / "c" / "1.0123abcd.partial").write_bytes(b"\x01")
    commit = zarr.open_group(str(tmp_path / "s"), mode="r")["commit"]
    assert read_commit_flags(tmp_path / "s", commit).tolist() == commit[:].tolist() == [1, 1, 1, 1, 2, 1, 1]
    assert len(store.manifest_sha256) == 64

    # a portrait and a landscape image in one padded batch: the store must hold the unpadded values
    ref = fake.detect(batch_of(coco, [2, 4]), topk=8, enc_layers=(4, 6))
    for b, image_id in enumerate([2, 4]):
        out, got_id = store.read(store.index_of(image_id))
        assert got_id == image_id and out.batch_size == 1 and out.c1.dtype == torch.float16
        assert torch.equal(out.boxes[0], ref.boxes[b].float()) and out.boxes.dtype == torch.float32
        assert torch.equal(out.logits[0], ref.logits[b].float())
        assert torch.equal(out.queries[0], ref.queries[b].half())
        h, w = ref.input_hw[b].tolist()
        assert torch.equal(out.c1[0], ref.c1[b, :, : -(-h // 4), : -(-w // 4)].half())
        for layer in (4, 6):
            for lvl, (lh, lw) in enumerate(ref.level_valid_hw[b].tolist()):
                assert torch.equal(out.enc_maps[layer][lvl][0], ref.enc_maps[layer][lvl][b, :, :lh, :lw].half())
        padded, _ = store.read(store.index_of(image_id), enc_layers=[6], crop=False)
        assert list(padded.enc_maps) == [6] and padded.c1.shape[-2:] == (32, 32)
        lh, lw = ref.level_valid_hw[b, 0].tolist()
        canvas = padded.enc_maps[6][0][0]
        assert canvas.shape[-2:] == (16, 16) and bool((canvas[:, lh:, :] == 0).all())
        assert bool((canvas[:, :, lw:] == 0).all()) and bool((canvas[:, :lh, :lw] != 0).any())
        padded.validate()
    with pytest.raises(MfdetrError, match="not complete"):
        store.read(4)
    with pytest.raises(MfdetrError, match=r"layers \[5\]"):
        store.read(0, enc_layers=[5])
    with pytest.raises(MfdetrError, match="checkpoint.sha256"):
        CacheStore.open(tmp_path / "s", expect={"checkpoint.sha256": "0" * 64})
    with pytest.raises(MfdetrError, match="preprocessing"):
        CacheStore.open(
            tmp_path / "s",
            expect={"preprocessing": {"short_side": 800, "max_size": 1333, "mean": [0.5] * 3, "std": [0.5] * 3}},
        )


def test_rerun_is_a_no_op_and_other_settings_refused(tmp_path, coco, fake):
    run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None)
    before = read_all(tmp_path / "s")
    again = run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None, detector=fake)
    assert again.planned == 0 and fake.forward_calls == 0
    after = read_all(tmp_path / "s")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(MfdetrError, match=r"different settings.*topk: 8 vs 4"):
        run_cache(job(coco, tmp_path / "s", topk=4), progress=False, echo=lambda s: None)
    # --retry-skipped recomputes only the skipped image (still corrupt: skipped again)
    retry = run_cache(job(coco, tmp_path / "s", retry_skipped=True), progress=False, echo=lambda s: None, detector=fake)
    assert retry.planned == 1 and len(retry.stats.skipped) == 1


def test_concurrent_creation_is_race_free(tmp_path, coco):
    m = build_manifest(
        preset=fd.PRESET,
        checkpoint_file="fake.pth",
        checkpoint_sha256="a" * 64,
        split="val2017",
        annotation_file="instances_val2017.json",
        annotation_sha256="b" * 64,
        image_ids=[1, 2, 3],
        topk=4,
        enc_layers=[4],
    )
    errors: list[BaseException] = []

    def create() -> None:
        try:
            open_for_writing(tmp_path / "s", m, np.array([1, 2, 3]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directory left behind
    assert CacheStore.open(tmp_path / "s").image_ids.tolist() == [1, 2, 3]
    other = dict(m, enc_layers=[5])
    with pytest.raises(MfdetrError, match="enc_layers"):
        open_for_writing(tmp_path / "s", other, np.array([1, 2, 3]))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(MfdetrError, match="not a Zarr v3 cache store"):
        open_for_writing(tmp_path / "junk", m, np.array([1, 2, 3]))


def test_non_finite_output_stops_naming_the_image(tmp_path, coco, fake):
    fake.nan_image_ids = {4}
    with pytest.raises(MfdetrError, match=r"non-finite values in 'logits' for image id 4 \(000004.png\)"):
        run_cache(job(coco, tmp_path / "s", batch_size=1), progress=False, echo=lambda s: None, detector=fake)
    flags = CacheStore.open(tmp_path / "s").commit_flags()
    assert flags[:3].tolist() == [COMMIT_DONE] * 3 and flags[3] == COMMIT_PENDING  # earlier images kept


def test_disk_full_stops_cleanly_and_resumes_identically(tmp_path, coco, fake, monkeypatch):
    import zarr.storage._local as local

    run_cache(job(coco, tmp_path / "ref"), progress=False, echo=lambda s: None, detector=fake)
    real_put = local._put
    calls = {"n": 0}

    def full_after_40(path, value, exclusive=False):  # 40 chunk files ≈ 2.7 images of 15 arrays
        calls["n"] += "/c/" in str(path)
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_after_40)
    with pytest.raises(MfdetrError, match="disk full.*rerun the same command"):
        run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None, detector=fake)
    monkeypatch.setattr(local, "_put", real_put)
    flags = CacheStore.open(tmp_path / "s").commit_flags()
    assert 0 < int((flags != COMMIT_PENDING).sum()) < 7
    run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None, detector=fake)
    assert_same_store(tmp_path / "ref", tmp_path / "s")


def test_writer_errors_surface_in_the_main_thread(tmp_path, coco, fake):
    m = build_manifest(
        preset=fd.PRESET,
        checkpoint_file="fake.pth",
        checkpoint_sha256="a" * 64,
        split="val2017",
        annotation_file="instances_val2017.json",
        annotation_sha256="b" * 64,
        image_ids=[1, 2, 3, 4],
        topk=8,
        enc_layers=[4],
    )
    root = open_for_writing(tmp_path / "s", m, np.array([1, 2, 3, 4]))
    writer = CacheWriter(root=root, path=tmp_path / "s", manifest=m)
    out = fake.detect(batch_of(coco, [1, 2]), topk=8, enc_layers=(6,))  # layer 6 is not in the store
    recs = records_from_output(out, indices=[0, 1], file_names=["a", "b"], image_ids=[1, 2])
    bg = BackgroundWriter(writer=writer, threads=2, queue_size=1)
    with pytest.raises(ValueError, match="lacks encoder layer 4"):
        for _ in range(50):
            bg.write_records(recs)
        bg.close()
    bg.close(raise_errors=False)
    assert CacheStore.open(tmp_path / "s").commit_flags().tolist() == [0, 0, 0, 0]


def test_image_larger_than_canvas_is_skipped_with_reason(tmp_path, coco, fake):
    m = build_manifest(
        preset=fd.PRESET,
        checkpoint_file="fake.pth",
        checkpoint_sha256="a" * 64,
        split="val2017",
        annotation_file="instances_val2017.json",
        annotation_sha256="b" * 64,
        image_ids=[1],
        topk=8,
        enc_layers=[4],
    )
    root = open_for_writing(tmp_path / "s", m, np.array([1]))
    writer = CacheWriter(root=root, path=tmp_path / "s", manifest=m)
    out = fake.detect(batch_of(coco, [1]), topk=8, enc_layers=(4,))
    [rec] = records_from_output(out, indices=[0], file_names=["a.png"], image_ids=[1])
    rec.arrays["level_valid_hw"][0] = [17, 3]  # level 0 taller than its map: the detector's fault, an error
    with pytest.raises(ValueError, match="exceeds the returned map"):
        writer.write_image(rec)
    rec.arrays["enc_layer4_level0"] = np.ones((16, 17, 9), dtype=np.float16)  # ... and than its 16-cell canvas
    writer.write_image(rec)
    store = CacheStore.open(tmp_path / "s")
    assert store.commit_flags().tolist() == [COMMIT_SKIPPED]
    assert "exceeds the store canvas 16x16" in store.skipped()[0][2]


def test_open_refuses_broken_stores(tmp_path, coco, fake):
    run_cache(job(coco, tmp_path / "s"), progress=False, echo=lambda s: None)
    meta = tmp_path / "s" / "zarr.json"
    original = meta.read_text()
    doc = json.loads(original)
    doc["attributes"]["mfdetr_cache"]["schema_version"] = 2
    meta.write_text(json.dumps(doc))
    with pytest.raises(MfdetrError, match="unknown cache schema version 2"):
        CacheStore.open(tmp_path / "s")
    doc["attributes"]["mfdetr_cache"]["schema_version"] = 1
    doc["attributes"]["mfdetr_cache"]["topk"] = "eight"
    meta.write_text(json.dumps(doc))
    with pytest.raises(MfdetrError, match=r"manifest.topk: expected integer"):
        CacheStore.open(tmp_path / "s")
    meta.write_text(original)
    qmeta = tmp_path / "s" / "queries" / "zarr.json"
    qdoc = json.loads(qmeta.read_text())
    qdoc["data_type"] = "float32"
    qmeta.write_text(json.dumps(qdoc))
    with pytest.raises(MfdetrError, match="array 'queries'.*float32"):
        CacheStore.open(tmp_path / "s")
