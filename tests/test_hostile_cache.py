"""Hostile inputs: a cache store damaged after it was written (lost, emptied, truncated or altered chunk
files, NaN written into a stored array, a corrupt commit byte) never yields wrong data silently.

Each case damages a copy of a real tiny store (the fake detector) and runs the real CLI in-process:
``inspect`` (plain and ``--verify``) reports it with counts that add up, ``train`` and ``eval`` stop with
one line naming the image id and the array (or skip and record it with ``--skip-damaged``: the
evaluation's predictions are then exactly the intact store's for the other images), and ``cache``
(plain rerun or ``--repair``) restores a store equal to the undamaged one, array for array.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import tests._fake_detector as fd
from mfdetr.cache.store import chunk_path
from tests._fake_detector import CHEAP, KINDS, assert_same_store, damage
from tests.conftest import assert_user_error, cli

N = 6


def cache_args(coco: Path, out: Path, *extra: str) -> list[str]:
    return fd.cache_args(coco, out, "--no-progress", *extra, enc_layers="4")


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An intact store, a MaskNet checkpoint trained on it and its evaluation's predictions."""
    root = tmp_path_factory.mktemp("hostile")
    coco = root / "coco"
    fd.make_coco(coco, n=N)
    fd.save_fake_checkpoint(coco / "fake.pth")
    store = root / "store"
    assert cli(*cache_args(coco, store)).returncode == 0
    cfg = fd.write_run_config(
        root / "tiny.toml", device="cpu", iterations=3, batch_size=2, num_workers=0, progress=False
    )
    run = root / "run"
    p = cli("train", "--cache", store, "--coco", coco, "--config", cfg, "--out", run)
    assert p.returncode == 0, p.stderr
    p = cli(*eval_args(store, coco, run / "ckpt.pt", root / "ref_results.json"))
    assert p.returncode == 0, p.stderr
    return {
        "root": root,
        "coco": coco,
        "store": store,
        "cfg": cfg,
        "ckpt": run / "ckpt.pt",
        "results": root / "ref_results.json",
    }


def eval_args(store: Path, coco: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--cache",
        str(store),
        "--coco",
        str(coco),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def counts(stdout: str) -> tuple[int, ...]:
    m = re.search(r"completeness: (\d+)/(\d+) done, (\d+) skipped, (\d+) pending, (\d+) damaged", stdout)
    assert m, stdout
    done, n, skipped, pending, damaged = map(int, m.groups())
    assert done + skipped + pending + damaged == n == N
    return done, skipped, pending, damaged


def test_intact_store_has_checksums_and_verifies(ref: dict[str, Path]) -> None:
    m = dict(zarr.open_group(str(ref["store"]), mode="r").attrs["mfdetr_cache"])
    assert m["codecs"]["checksum"] == {"name": "crc32c"}
    p = cli("inspect", "--verify", "--no-progress", ref["store"])
    assert p.returncode == 0, p.stderr
    assert counts(p.stdout) == (N, 0, 0, 0) and "checksums crc32c" in p.stdout


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_store_is_reported_never_read_as_data(ref: dict[str, Path], tmp_path: Path, kind: str) -> None:
    store = tmp_path / "store"
    shutil.copytree(ref["store"], store)
    iid = damage(store, kind)
    array = KINDS[kind][1]
    named = (f"image id {iid}", f"array '{array}'", str(store))

    # inspect: the cheap check finds lost files and bad flags; --verify decodes and finds everything
    plain = cli("inspect", store)
    if kind in CHEAP:
        assert_user_error(plain, "1 damaged image(s)", *named[:2])
        assert counts(plain.stdout)[3] == 1
    else:
        assert plain.returncode == 0 and counts(plain.stdout) == (N, 0, 0, 0), plain.stderr
        assert "--verify decodes every image" in plain.stdout
    ver = cli("inspect", "--verify", "--no-progress", store)
    assert_user_error(ver, "1 damaged image(s)", *named[:2])
    assert counts(ver.stdout) == (N - 1, 0, 0, 1) and f"damaged image id {iid}" in ver.stdout

    # train and eval stop with one line naming store, image id and array
    run = tmp_path / "run"
    train = ["train", "--cache", store, "--coco", ref["coco"], "--config", ref["cfg"], "--out", run]
    assert_user_error(cli(*train), *named)
    assert_user_error(cli(*eval_args(store, ref["coco"], ref["ckpt"], tmp_path / "r.json")), *named)

    # ... or skip it and record it
    p = cli(*train, "--skip-damaged")
    assert p.returncode == 0, p.stderr
    assert [(d["image_id"], d["array"]) for d in json.loads((run / "damaged_images.json").read_text())] == [
        (iid, array)
    ]
    assert f"skipping damaged image id {iid}" in p.stderr
    p = cli(*eval_args(store, ref["coco"], ref["ckpt"], tmp_path / "r.json", "--skip-damaged"))
    assert p.returncode == 0, p.stderr
    assert f"skipped damaged images: 1 (image ids {iid})" in p.stdout
    want = [r for r in json.loads(ref["results"].read_text()) if r["image_id"] != iid]
    got = json.loads((tmp_path / "r.json").read_text())
    assert [(r["image_id"], r["segmentation"]) for r in got] == [(r["image_id"], r["segmentation"]) for r in want]
    assert np.allclose([r["score"] for r in got], [r["score"] for r in want], rtol=1e-5)

    # a plain rerun recomputes what the cheap check finds; --repair decodes everything and recomputes the rest
    p = cli(*cache_args(ref["coco"], store))
    assert p.returncode == 0, p.stderr
    if kind not in CHEAP:
        assert "0 damaged image(s) to recompute (--repair also decodes every image)" in p.stdout
        assert cli("inspect", "--verify", "--no-progress", store).returncode != 0
        p = cli(*cache_args(ref["coco"], store, "--repair"))
        assert p.returncode == 0, p.stderr
        assert "1 damaged image(s) to recompute" in p.stdout
    assert f"damaged image id {iid}" in p.stdout and "done: 1 images this run" in p.stdout
    assert_same_store(ref["store"], store)
    assert cli("inspect", "--verify", "--no-progress", store).returncode == 0


def test_dataloader_worker_errors_print_one_line(ref: dict[str, Path], tmp_path: Path) -> None:
    """Damage met in DataLoader worker processes: the same one line (no worker traceback), also when the
    dataset raises inside the worker."""
    from torch.utils.data import DataLoader

    from mfdetr.cli import one_line
    from mfdetr.engine.cache_data import CacheDataset, open_annotations, open_cache
    from mfdetr.errors import MfdetrError

    store = tmp_path / "store"
    shutil.copytree(ref["store"], store)
    iid = damage(store, "truncated")
    p = cli(
        "train",
        "--cache",
        store,
        "--coco",
        ref["coco"],
        "--config",
        ref["cfg"],
        "--out",
        tmp_path / "run",
        "train.num_workers=1",
    )
    assert_user_error(p, f"image id {iid}", "array 'c1'", "checksum mismatch")
    s = open_cache(store)
    ds = CacheDataset(store=s, coco_split=open_annotations(s, coco=ref["coco"]), enc_layer=4)
    with pytest.raises(MfdetrError) as e:
        list(DataLoader(ds, batch_size=None, num_workers=1))
    assert "Traceback" in str(e.value)  # torch's wrapping of a worker's error ...
    line = one_line(str(e.value))  # ... which the CLI reduces to the original message
    assert "\n" not in line and line.startswith(f"{store}: damaged cache: image id {iid}") and "array 'c1'" in line


def test_store_without_checksums_still_reads_and_detects_loss(
    ref: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store written before checksums (no codecs.checksum) opens, verifies and is repaired in its own
    format by today's command; lost files are still found."""
    import mfdetr.cache.run as run_mod

    store = tmp_path / "old"
    real_plan = run_mod.plan_job

    def plan_without_checksum(job: run_mod.CacheJob) -> object:
        plan = real_plan(job)
        plan.manifest["codecs"].pop("checksum")
        return plan

    with monkeypatch.context() as mp:
        mp.setattr(run_mod, "plan_job", plan_without_checksum)
        assert cli(*cache_args(ref["coco"], store)).returncode == 0
    assert "checksum" not in zarr.open_group(str(store), mode="r").attrs["mfdetr_cache"]["codecs"]
    p = cli("inspect", "--verify", "--no-progress", store)
    assert p.returncode == 0 and "checksums none" in p.stdout, p.stderr
    iid = damage(store, "missing_chunk")
    assert_user_error(cli("inspect", store), f"image id {iid}", "array 'boxes'", "missing")
    p = cli(*cache_args(ref["coco"], store, "--dry-run"))
    assert p.returncode == 0 and f"{N - 1} already done; 1 to compute (1 of them damaged)" in p.stdout, p.stderr
    p = cli(*cache_args(ref["coco"], store))
    assert p.returncode == 0, p.stderr
    assert "done: 1 images this run" in p.stdout
    assert "checksum" not in zarr.open_group(str(store), mode="r").attrs["mfdetr_cache"]["codecs"]
    assert cli("inspect", "--verify", "--no-progress", store).returncode == 0


def test_damaged_validation_cache_is_skipped_and_recorded(ref: dict[str, Path], tmp_path: Path) -> None:
    val = tmp_path / "val"
    shutil.copytree(ref["store"], val)
    iid = damage(val, "flipped")
    run = tmp_path / "run"
    train = [
        "train",
        "--cache",
        ref["store"],
        "--val-cache",
        val,
        "--coco",
        ref["coco"],
        "--config",
        ref["cfg"],
        "--out",
        run,
    ]
    assert_user_error(cli(*train), str(val), f"image id {iid}", "array 'logits'", "checksum mismatch")
    p = cli(*train[:-1], tmp_path / "run2", "--skip-damaged")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "run2" / "val_metrics.json").read_text())["skipped_damaged_image_ids"] == [iid]
    assert [d["image_id"] for d in json.loads((tmp_path / "run2" / "damaged_images.json").read_text())] == [iid]
    iid = damage(val, "missing_chunk")  # a lost file of the validation cache stops the run before training
    assert_user_error(cli(*train[:-1], tmp_path / "run3"), f"image id {iid}", "array 'boxes'", "missing")
    assert not (tmp_path / "run3" / "ckpt.pt").exists()


def test_damaged_image_ids_chunk_is_one_line(ref: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(ref["store"], store)
    g = zarr.open_group(str(store), mode="r")
    path = chunk_path(store, g["image_ids"], 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_user_error(cli("inspect", store), str(store), "array 'image_ids' cannot be decoded")
    path.unlink()  # read as zeros by zarr: the ids no longer match the manifest's hash
    assert_user_error(
        cli("eval", "--cache", store, "--coco", ref["coco"], "--checkpoint", ref["ckpt"]), "image_ids do not match"
    )


def test_rerun_of_a_finished_store_writes_nothing(ref: dict[str, Path], tmp_path: Path) -> None:
    """A rerun with nothing to do (e.g. on a read-only copy) creates, changes and deletes no file."""
    store = tmp_path / "store"
    shutil.copytree(ref["store"], store)

    def files() -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(store)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(store.rglob("*"))
            if p.is_file()
        }

    before = files()
    p = cli(*cache_args(ref["coco"], store))
    assert p.returncode == 0 and "done: 0 images this run" in p.stdout, p.stderr
    assert files() == before
