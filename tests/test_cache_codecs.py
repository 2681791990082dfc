"""Feature codec presets (``mfdetr cache --codec``): round trips through real tiny stores, error bounds,
the manifest record and its validation, refusals, and the dry run's size table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import tests._fake_detector as fd
from tests._fake_detector import cache_args
from tests.conftest import assert_user_error, cli
from mfdetr.cache import CacheJob, CacheStore, CacheWriter, inspect_store, records_from_output, run_cache
from mfdetr.cache.codecs import PRESETS, get_preset
from mfdetr.cache.manifest import MANIFEST_ATTR
from mfdetr.cache.schema import load_manifest_schema
from mfdetr.cache.store import open_for_writing
from mfdetr.errors import MfdetrError

FEATURES = ("queries", "enc_layer4_level0", "enc_layer4_level3", "enc_layer6_level1", "c1")
EXACT = ("boxes", "logits", "input_hw", "orig_hw", "level_valid_hw", "image_ids", "commit")
pytestmark = pytest.mark.usefixtures("fake_plugin")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_codecs")
    fd.make_coco(root, n=4)
    fd.save_fake_checkpoint(root / "fake.pth")
    return root


def make_store(coco: Path, out: Path, codec: str | None) -> Path:
    kw = {} if codec is None else {"codec": codec}
    job = CacheJob(
        detector=fd.NAME,
        checkpoint=coco / "fake.pth",
        coco=coco,
        split="val2017",
        out=out,
        topk=8,
        enc_layers=(4, 6),
        num_workers=0,
        writer_threads=1,
        **kw,
    )
    summary = run_cache(job, progress=False, echo=lambda s: None, detector=fd.build_fake())
    assert summary.store_done == 4
    return out


@pytest.fixture(scope="module")
def stores(coco, tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    out = {name: make_store(coco, base / name, name) for name in PRESETS}
    out["default"] = make_store(coco, base / "default", None)
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {n: root[n][:] for n in root.array_keys()}


def test_default_is_lossless_and_identical_to_a_store_without_presets(stores):
    ref, default = arrays(stores["lossless"]), arrays(stores["default"])
    for name in ref:
        assert ref[name].dtype == default[name].dtype and np.array_equal(ref[name], default[name]), name
    m = CacheStore.open(stores["default"]).manifest
    assert m["codecs"] == {
        "data": {"name": "zstd", "level": 1},
        "commit": {"name": "none"},
        "preset": "lossless",
        "feature_filters": [],
        "checksum": {"name": "crc32c"},
    }
    root = zarr.open_group(str(stores["default"]), mode="r")
    for name in FEATURES:  # no filter in the chain: the array metadata of a store without presets
        meta = json.loads((stores["default"] / name / "zarr.json").read_text())
        assert "numcodecs" not in json.dumps(meta["codecs"]) and root[name].filters == (), name
    # chunk files of every array are byte-identical between two lossless stores
    for name in FEATURES:
        a = sorted(p.relative_to(stores["lossless"]) for p in (stores["lossless"] / name).rglob("*") if p.is_file())
        for rel in a:
            assert (stores["lossless"] / rel).read_bytes() == (stores["default"] / rel).read_bytes(), rel


def test_lossless_round_trip_is_bit_exact_against_the_detector(stores, coco):
    from mfdetr.data import CocoInstances, collate

    st = CacheStore.open(stores["lossless"])
    ds = CocoInstances(coco, "val2017", preprocessing=fd.PRESET.preprocessing, with_targets=False)
    det = fd.build_fake()
    for i in st.complete_indices().tolist():
        got, iid = st.read(i)
        want = det.detect(collate([ds[ds.index_of(iid)]]), topk=8, enc_layers=(4, 6))
        assert torch.equal(got.queries, want.queries.half()) and torch.equal(got.boxes, want.boxes)
        assert torch.equal(got.c1, want.c1.half()) and torch.equal(got.logits, want.logits)
        for e in (4, 6):
            for lvl in range(4):
                assert torch.equal(got.enc_maps[e][lvl], want.enc_maps[e][lvl].half())


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "lossless"])
def test_lossy_round_trip_within_the_stated_bound(stores, name):
    preset = get_preset(name)
    ref, got = arrays(stores["lossless"]), arrays(stores[name])
    changed = 0
    for n in FEATURES:
        x, y = ref[n].astype(np.float64), got[n].astype(np.float64)
        assert got[n].dtype == np.float16 and np.isfinite(y).all(), n
        err = np.abs(y - x)
        assert (err <= preset.bound(ref[n])).all(), (n, float((err - preset.bound(ref[n])).max()))
        assert (y[x == 0] == 0).all(), n  # zeros (padding, ReLU) stay zeros
        changed += int((err > 0).sum())
    assert changed > 0  # the preset is really lossy
    for n in EXACT:  # boxes, logits, sizes and flags are never filtered
        assert np.array_equal(ref[n], got[n]), n


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "lossless"])
def test_bounds_hold_over_the_whole_float16_range(tmp_path, name):
    """Through a real sharded zarr array with the preset's filters: normals of every exponent, subnormals,
    zeros, and the largest magnitude the preset accepts."""
    from zarr.codecs import ZstdCodec

    preset = get_preset(name)
    rng = np.random.default_rng(0)
    mags = np.exp(rng.uniform(np.log(2.0**-24), np.log(preset.max_abs), size=4096))
    x = (mags * rng.choice([-1.0, 1.0], size=mags.size)).astype(np.float16)
    x[:4] = [0.0, 2.0**-24, -(2.0**-20), preset.max_abs]
    x = x.reshape(1, 4, 32, 32)
    arr = zarr.create_array(
        str(tmp_path / "a"),
        shape=x.shape,
        dtype="float16",
        shards=x.shape,
        chunks=(1, 4, 16, 16),
        filters=preset.filters(),
        compressors=(ZstdCodec(level=1),),
        fill_value=0,
    )
    arr[:] = x
    y = zarr.open_array(str(tmp_path / "a"), mode="r")[:]
    assert np.isfinite(y).all()
    assert (np.abs(y.astype(np.float64) - x.astype(np.float64)) <= preset.bound(x)).all()


def test_manifest_records_the_preset_and_a_reader_needs_no_flag(stores):
    st = CacheStore.open(stores["bitround-4"])
    assert st.manifest["codecs"]["preset"] == "bitround-4"
    assert st.manifest["codecs"]["feature_filters"] == [
        {"name": "numcodecs.bitround", "configuration": {"keepbits": 4}}
    ]
    meta = json.loads((stores["bitround-4"] / "c1" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]  # sharded: the filter runs on every tile
    assert inner[0] == {"name": "numcodecs.bitround", "configuration": {"keepbits": 4}}
    out, _ = st.read(0)
    assert out.c1.dtype == torch.float16 and torch.isfinite(out.c1).all()
    assert json.loads((stores["bitround-4"] / "boxes" / "zarr.json").read_text())["codecs"][0]["name"] == "bytes"
    lines, facts = inspect_store(stores["bitround-4"])
    assert facts["arrays"]["c1"]["filters"] == st.manifest["codecs"]["feature_filters"]
    assert facts["arrays"]["boxes"]["filters"] == []
    assert any(ln.split()[0] == "c1" and "bitround+zstd" in ln for ln in lines if ln.strip())


def test_schema_lists_every_preset():
    assert load_manifest_schema()["properties"]["codecs"]["properties"]["preset"]["enum"] == list(PRESETS)


def _rewrite_manifest(path: Path, edit) -> None:
    root = zarr.open_group(str(path), mode="r+")
    m = dict(root.attrs[MANIFEST_ATTR])
    edit(m)
    root.attrs[MANIFEST_ATTR] = m


def test_validation_refuses_filters_that_differ_from_the_manifest(stores, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(stores["quantize-1"], bad)

    def claim_lossless(m):
        m["codecs"] = {**m["codecs"], "preset": "lossless", "feature_filters": []}

    _rewrite_manifest(bad, claim_lossless)
    with pytest.raises(MfdetrError, match="has filters .*numcodecs.quantize.* preset 'lossless'"):
        CacheStore.open(bad)


def test_a_manifest_without_preset_is_lossless_and_resumable(stores, coco, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(stores["lossless"], old)

    def drop_preset(m):
        m["codecs"] = {k: v for k, v in m["codecs"].items() if k not in ("preset", "feature_filters")}

    _rewrite_manifest(old, drop_preset)
    st = CacheStore.open(old)
    assert "preset" not in st.manifest["codecs"] and st.read(0)[0].c1.dtype == torch.float16
    new = dict(CacheStore.open(stores["lossless"]).manifest)
    open_for_writing(old, new, st.image_ids)  # same settings: accepted for resuming
    proc = cli(*cache_args(coco, old, "--dry-run"))
    assert proc.returncode == 0 and "4 already done; 0 to compute" in proc.stdout, proc.stderr
    assert_user_error(
        cli(*cache_args(coco, old, "--dry-run", "--codec", "bitround-7")), "cache was made with codecs=", "bitround-7"
    )


def test_rerun_with_another_codec_is_refused_in_one_line(coco, stores):
    proc = cli(*cache_args(coco, stores["lossless"], "--codec", "bitround-7"))
    assert_user_error(proc, "different settings", "codecs.preset", "bitround-7")


def test_unknown_codec_is_a_one_line_cli_error(coco, tmp_path):
    proc = cli(*cache_args(coco, tmp_path / "s", "--codec", "jpeg"))
    assert_user_error(proc, "--codec 'jpeg'", "lossless, bitround-7, bitround-4, quantize-1")
    assert not (tmp_path / "s").exists()


def test_value_beyond_the_preset_range_stops_the_writer(coco, tmp_path):
    from mfdetr.data import CocoInstances, collate

    job = CacheJob(
        detector=fd.NAME,
        checkpoint=coco / "fake.pth",
        coco=coco,
        split="val2017",
        out=tmp_path / "s",
        topk=8,
        enc_layers=(4,),
        codec="quantize-1",
    )
    from mfdetr.cache.run import plan_job

    plan = plan_job(job)
    root = open_for_writing(tmp_path / "s", plan.manifest, plan.image_ids)
    ds = CocoInstances(coco, "val2017", preprocessing=fd.PRESET.preprocessing, with_targets=False)
    batch = collate([ds[0]])
    out = fd.build_fake().detect(batch, topk=8, enc_layers=(4,))
    [rec] = records_from_output(out, indices=[0], file_names=batch.file_names, image_ids=batch.image_ids)
    rec.arrays["c1"][0, 0, 0] = 5000.0
    writer = CacheWriter(root=root, path=tmp_path / "s", manifest=plan.manifest)
    with pytest.raises(MfdetrError, match=r"5000 in 'c1' for image id 1 .*--codec quantize-1.*\|x\| <= 4094"):
        writer.write_image(rec)
    assert CacheStore.open(tmp_path / "s").commit_flags()[0] == 0  # nothing committed
    rec.arrays["c1"][0, 0, 0] = 4000.0  # within range: stored
    writer.write_image(rec)
    assert CacheStore.open(tmp_path / "s").commit_flags()[0] == 1


def _table_rows(stdout: str) -> dict[tuple[str, str], str]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.lstrip("* ").split()
        if len(parts) >= 3 and parts[0] in PRESETS and parts[1] in ("store", "recompute"):
            rows[(parts[0], parts[1])] = line
    return rows


def test_dry_run_prints_a_row_per_codec_and_c1_mode(coco, tmp_path, stores):
    proc = cli(*cache_args(coco, tmp_path / "s", "--dry-run", "--codec", "bitround-4"))
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert sorted(rows) == sorted((p, m) for p in PRESETS for m in ("store", "recompute"))
    assert rows[("bitround-4", "store")].startswith("*") and "ratios assumed" in proc.stdout
    assert "split total (4 images)" in proc.stdout and not (tmp_path / "s").exists()
    # on a store holding finished lossless images the ratios are measured on one of them
    proc = cli(*cache_args(coco, stores["lossless"], "--dry-run"))
    assert proc.returncode == 0, proc.stderr
    assert "ratios measured by encoding image index 0" in proc.stdout
    assert len(_table_rows(proc.stdout)) == 2 * len(PRESETS)


def test_size_table_orders_presets_and_drops_c1_for_recompute():
    from mfdetr.cache.sizes import ASSUMED_RATIOS, size_table

    raw = {"enc": 1000.0, "c1": 3000.0, "queries": 100.0, "other": 50.0}
    rows = {(r.preset, r.c1_mode): r for r in size_table(raw, 2, ASSUMED_RATIOS)}
    for p in PRESETS:
        r = ASSUMED_RATIOS[p]
        assert rows[(p, "store")].total_bytes == pytest.approx(sum(raw[k] / r[k] for k in raw))
        assert rows[(p, "store")].total_bytes - rows[(p, "recompute")].total_bytes == pytest.approx(3000 / r["c1"])
        assert rows[(p, "store")].bytes_per_image == pytest.approx(rows[(p, "store")].total_bytes / 2)
    assert (
        rows[("bitround-4", "store")].total_bytes
        < rows[("bitround-7", "store")].total_bytes
        < rows[("lossless", "store")].total_bytes
    )
