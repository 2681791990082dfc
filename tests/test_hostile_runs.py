"""Hostile but realistic input to the run commands: code-executing checkpoints, resumes on other data or
from damaged checkpoints, out-of-range configs and options, wrong or unwritable output paths, a wrong
detector checkpoint.

Every damaged input is built here. Each case: exit status 2 with exactly one ``mfdetr: error:`` line
(no traceback), and no side effect (no payload run, no folder or store created, no record changed).
The commands run in-process (``tests.conftest.cli``: typer's ``CliRunner``); one payload case goes through a real
process. How a training run stops (Ctrl-C, a non-finite loss or weights) is tested in
``tests/test_hostile_stops.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tests._fake_detector as fd
import tests._tiny_detector as tinydet
from tests.conftest import assert_user_error, cli, refused, run_cli
from tests._fake_detector import TINY, write_cache


class _Payload:
    """Unpickling this object opens (creates) ``marker``: any load that runs code from the file shows."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "step": 1, "config": {}, "masknet_config": {},
                "meta": {"note": _Payload(marker)}}, path)
    return path


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fd.register()
    root = tmp_path_factory.mktemp("hostile")
    coco = root / "coco"
    fd.make_coco(coco, n=4, split="train2017")
    fd.make_coco(coco, n=3, split="val2017", seed=1)
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    other = fd.save_fake_checkpoint(root / "other.pth", seed=1)
    caches = {"train": write_cache(coco, "train2017", root / "c_train", ckpt),
              "val": write_cache(coco, "val2017", root / "c_val", ckpt),
              "train_other": write_cache(coco, "train2017", root / "c_train_other", other)}
    cfg = fd.write_run_config(root / "tiny.toml", device="cpu", iterations=2, batch_size=2, log_every=1, num_workers=0,
                              progress=False, lr=1e-3)
    run = root / "run"
    r = cli("train", "--cache", caches["train"], "--coco", coco, "--config", cfg, "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "coco": coco, "fake": ckpt, "cfg": cfg, "run": run, **caches}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---- no code from a checkpoint ---------------------------------------------------------------------------

def test_code_executing_pickle_is_refused_by_every_command(s: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    evil = write_payload(tmp_path / "evil.pt", marker)
    image = s["coco"] / "val2017" / "000001.png"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(evil, resumed / "ckpt.pt")
    store = tmp_path / "store"
    tinydet_masknet = _tinydet_masknet(tmp_path / "masknet_tinydet.pt")
    commands = [
        ("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", evil),
        ("eval", "--online", "--coco", s["coco"], "--split", "val2017", "--checkpoint", evil),
        ("predict", image, "--detector", fd.NAME, "--checkpoint", s["fake"], "--masknet", evil,
         "--out", tmp_path / "pred1"),
        ("predict", image, "--detector", tinydet.NAME, "--checkpoint", evil, "--masknet", tinydet_masknet,
         "--out", tmp_path / "pred2"),
        ("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", resumed, "--resume"),
        ("cache", "--detector", tinydet.NAME, "--checkpoint", evil, "--coco", s["coco"], "--split", "val2017",
         "--topk", "10", "--out", store, "--workers", "0", "--no-progress"),
    ]
    for args in commands:
        refused(cli(*args), "ckpt.pt" if "--resume" in args else "evil.pt", "refused", "GLOBAL io.open")
        assert not marker.exists(), args
    assert not store.exists() and not (tmp_path / "pred1").exists()
    # and once through a real process
    assert_user_error(run_cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", evil), "refused")
    assert not marker.exists()


def _tinydet_masknet(path: Path) -> Path:
    from mfdetr.config import to_dict
    from mfdetr.detectors import get_preset
    from mfdetr.masknet import build_masknet

    preset, cfg = get_preset(tinydet.NAME), tinydet.tiny_masknet_config()
    model = build_masknet(cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides,
                          c1_channels=preset.c1_channels)
    torch.save({"masknet_config": to_dict(cfg), "model": model.state_dict(), "detector": tinydet.NAME,
                "class_to_category": list(preset.class_to_category)}, path)
    return path


def test_checkpoint_of_the_earlier_format_still_loads_and_resumes(s: dict[str, Path], tmp_path: Path) -> None:
    """Numpy ndarray RNG state and torch's version object (what the trainer used to store) are allow-listed."""
    import numpy as np
    from torch.torch_version import TorchVersion

    run = tmp_path / "old"
    shutil.copytree(s["run"], run)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    for st in ck["rng"].values():
        kind, keys, pos, has_gauss, gauss = st["numpy"]
        st["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
        st["python"] = tuple(st["python"][:1]) + (tuple(st["python"][1]), st["python"][2])
    ck["meta"]["versions"]["torch"] = TorchVersion(torch.__version__)
    ck["step"] = 1  # one step left to run after restoring those states
    torch.save(ck, run / "ckpt.pt")
    with pytest.raises(Exception, match="weights_only|Weights only"):
        torch.load(run / "ckpt.pt", weights_only=True)  # the plain weights-only load refuses this file
    r = cli("train", "--cache", s["train"], "--coco", s["coco"], "--out", run, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step 1" in r.stdout + r.stderr
    new = torch.load(run / "ckpt.pt", weights_only=True)  # rewritten as plain data
    assert new["step"] == 2 and isinstance(new["rng"][0]["numpy"][1], list)


# ---- consistent runs ------------------------------------------------------------------------------------

def test_one_manifest_hash_is_recorded_and_compared(s: dict[str, Path]) -> None:
    from mfdetr.cache import CacheStore
    from mfdetr.engine.cache_data import manifest_sha256

    store = CacheStore.open(s["train"])
    recorded = json.loads((s["run"] / "run.json").read_text())["manifest_sha256"]
    assert store.manifest_sha256 == manifest_sha256(store.manifest) == recorded


@pytest.mark.parametrize("other, needle", [("train_other", "checkpoint.sha256"), ("val", "source.annotation")])
def test_resume_refuses_another_cache(s: dict[str, Path], tmp_path: Path, other: str, needle: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    before = _snapshot(run)
    line = refused(cli("train", "--cache", s[other], "--coco", s["coco"], "--out", run, "--resume"),
                   "cannot resume with a different training cache", needle)
    assert "(run) vs" in line
    assert _snapshot(run) == before  # run.json keeps the recorded hash


def test_resume_refuses_another_cache_for_a_run_that_recorded_only_the_hash(s: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    del ck["meta"]["cache_manifest"]
    torch.save(ck, run / "ckpt.pt")
    refused(cli("train", "--cache", s["train_other"], "--coco", s["coco"], "--out", run, "--resume"),
            "different training cache", "manifest_sha256")


def test_online_resume_refuses_another_detector_checkpoint(s: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "online"
    args = ("train", "--online", "--detector", fd.NAME, "--coco", s["coco"], "--split", "train2017", "--topk", "8",
            "--config", s["cfg"], "--out", run, "train.iterations=1")
    r = cli(*args, "--checkpoint", s["fake"])
    assert r.returncode == 0, r.stdout + r.stderr
    before = _snapshot(run)
    refused(cli(*args, "--checkpoint", s["root"] / "other.pth", "--resume"),
            "cannot resume with a different detector or training data", "checkpoint_sha256")
    refused(cli(*args, "--checkpoint", s["fake"], "--resume", "--split", "val2017"), "split", "annotation_sha256")
    assert _snapshot(run) == before


def test_sweep_resume_refuses_another_cache(s: dict[str, Path], tmp_path: Path) -> None:
    sweep = _sweep_file(tmp_path, train=True)
    base = ["--val-cache", s["val"], "--coco", s["coco"], "--out", tmp_path / "out"]
    tiny = [f"masknet.{k}.{kk}={vv}" for k, v in TINY.items() if isinstance(v, dict) for kk, vv in v.items()]
    tiny += [f"masknet.{k}={v}" for k, v in TINY.items() if not isinstance(v, dict)]
    over = ["train.device=\"cpu\"", "train.iterations=1", "train.batch_size=2", "train.num_workers=0",
            "train.progress=false", *tiny]
    r = cli("sweep", sweep, "--cache", s["train"], *base, *over)
    assert r.returncode == 0, r.stdout + r.stderr
    # a finished variant is not reused for other inputs (another cache, another config)
    refused(cli("sweep", sweep, "--cache", s["train_other"], *base, *over), "variant a was run with other inputs",
            "sources.train_cache")
    refused(cli("sweep", sweep, "--cache", s["train"], *base, *over, "train.lr=0.01"), "config.train.lr")
    assert cli("sweep", sweep, "--cache", s["train"], *base, *over, "train.num_workers=1").returncode == 0
    # an unfinished one is not resumed on another cache (here: the same settings, written again)
    (tmp_path / "out" / "a" / "result.json").unlink()
    time.sleep(1.0)  # the manifest records its creation time to the second
    again = write_cache(s["coco"], "train2017", tmp_path / "again", s["fake"])
    refused(cli("sweep", sweep, "--cache", again, *base, *over), "different training cache", "created_utc")


@pytest.mark.parametrize("damage, needle", [
    (lambda c: c.pop("optimizer"), "cannot restore the training state (KeyError"),
    (lambda c: c.update(step="two"), "cannot restore the training state (ValueError"),
    (lambda c: c["rng"][0].update(numpy=[1, 2]), "cannot restore the training state"),
    (lambda c: c["model"].pop(sorted(c["model"])[0]), "weights do not fit this run's model (missing 1:")])
def test_resume_from_a_damaged_checkpoint_is_one_line(s: dict[str, Path], tmp_path: Path, damage: Any,
                                                      needle: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    damage(ck)
    ck["step"] = 1 if isinstance(ck["step"], int) else ck["step"]
    torch.save(ck, run / "ckpt.pt")
    refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--out", run, "--resume"), "ckpt.pt", needle)


@pytest.mark.parametrize("override, needle", [
    ("train.lr=inf", "lr=inf"), ("train.lr=nan", "lr=nan"), ("train.lr=-1", "lr must lie in (0, 1]"),
    ("train.lr=1e39", "lr must lie in (0, 1]"),
    ("train.weight_decay=-5", "weight_decay"), ("train.weight_decay=nan", "weight_decay"),
    ("train.betas=[1.0, 0.9]", "betas"), ("train.betas=[0.9, nan]", "betas"),
    ("train.clip_grad_norm=-1", "clip_grad_norm"), ("train.clip_grad_norm=inf", "clip_grad_norm"),
    ("train.lr_drop_factor=nan", "lr_drop_factor"), ("train.lr_drop_factor=0", "lr_drop_factor"),
    ("train.lr_drop_factor=2", "lr_drop_factor"), ("train.num_workers=-1", "num_workers"),
    ("train.seed=-1", "seed"), ("train.iterations=-3", "iterations"), ("train.batch_size=0", "batch_size"),
    ("online.detector_lr_mult=nan", "detector_lr_mult")])
def test_out_of_range_config_is_one_line(s: dict[str, Path], tmp_path: Path, override: str, needle: str) -> None:
    out = tmp_path / "run"
    refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", out, override),
            needle)
    assert not out.exists()


def test_negative_seeds_and_workers_of_other_commands(s: dict[str, Path], tmp_path: Path) -> None:
    refused(cli("synth", "--out", tmp_path / "synth", "--seed", "-5"), "--seed")
    cache = ("cache", "--detector", fd.NAME, "--checkpoint", s["fake"], "--coco", s["coco"], "--split", "val2017",
             "--out", tmp_path / "store")
    refused(cli(*cache, "--workers", "-1"), "--workers")
    refused(cli(*cache, "--enc-layers", "9"), "--enc-layers")
    refused(cli(*cache, "--topk", "0"), "--topk")
    refused(cli(*cache, "--writer-threads", "0"), "--writer-threads")
    refused(cli("predict", s["coco"] / "val2017", "--detector", fd.NAME, "--masknet", s["run"] / "ckpt.pt",
                "--out", tmp_path / "pred", "--workers", "-1"), "--workers")
    assert list(tmp_path.iterdir()) == []


def test_eval_checkpoint_without_config_and_mismatched_weights(s: dict[str, Path], tmp_path: Path) -> None:
    good = torch.load(s["run"] / "ckpt.pt", weights_only=True)
    bare = tmp_path / "bare.pt"
    torch.save({"model": good["model"], "step": 2}, bare)
    refused(cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", bare), "'config'")
    dropped = sorted(good["model"])[0]
    sd = {k: v for k, v in good["model"].items() if k != dropped}
    sd["bogus.weight"] = torch.zeros(3)
    bad = tmp_path / "mismatch.pt"
    torch.save({**good, "model": sd}, bad)
    refused(cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", bad),
            "weights do not fit", f"missing 1: {dropped}", "unexpected 1: bogus.weight")


def test_list_valued_image_id_is_ignored_and_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdetr.data.annotations import load_annotation_file

    path = fd.make_coco(tmp_path / "coco", n=2, split="val2017")
    data = json.loads(path.read_text())
    bad_id = data["annotations"][0]["id"]
    data["annotations"][0]["image_id"] = [1]
    path.write_text(json.dumps(data))
    kept, _sha = load_annotation_file(path)
    assert [a["id"] for a in kept["annotations"]] == [a["id"] for a in data["annotations"][1:]]
    err = capsys.readouterr().err
    assert err.count("mfdetr: warning:") == 1 and "non-integer image_id" in err and f"id {bad_id}" in err
    (tmp_path / "res.json").write_text("[]")
    r = cli("eval-json", "--coco", tmp_path / "coco", "--results", tmp_path / "res.json")
    assert "Traceback" not in r.stdout + r.stderr  # an escaping exception is written there as a traceback


def test_cache_checks_the_checkpoint_before_creating_the_store(s: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.data import SynthConfig, generate_synth

    coco = tmp_path / "synth"
    generate_synth(coco, config=SynthConfig(train=0, val=2, image_size=40, seed=3))
    work = tmp_path / "work"
    work.mkdir()
    store = work / "store"
    args = ("cache", "--detector", tinydet.NAME, "--coco", coco, "--split", "val2017", "--out", store,
            "--topk", "10", "--workers", "0", "--no-progress")
    refused(cli(*args, "--checkpoint", s["fake"]), "fake.pth")  # another detector's weights
    assert list(work.iterdir()) == []
    r = cli(*args, "--checkpoint", tinydet.save_detector_checkpoint(tmp_path / "det.pth"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 done, 0 skipped, 0 pending" in r.stdout + r.stderr


# ---- output paths ---------------------------------------------------------------------------------------

def test_wrong_kind_of_output_path(s: dict[str, Path], tmp_path: Path) -> None:
    afile = tmp_path / "a_file"
    afile.write_text("x")
    adir = tmp_path / "a_dir"
    adir.mkdir()
    refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", afile),
            "must be a folder")
    refused(cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", s["run"] / "ckpt.pt",
                "--out", adir), "existing folder")
    refused(cli("cache", "--detector", fd.NAME, "--checkpoint", s["fake"], "--coco", s["coco"], "--split",
                "val2017", "--out", afile, "--workers", "0"), "must be a folder")
    refused(cli("predict", s["coco"] / "val2017", "--detector", fd.NAME, "--checkpoint", s["fake"], "--masknet",
                s["run"] / "ckpt.pt", "--out", afile), "must be a folder")
    refused(cli("sweep", _sweep_file(tmp_path), "--cache", s["train"], "--val-cache", s["val"], "--out", afile),
            "must be a folder")
    refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", afile / "run"),
            "is a file, not a folder")
    assert afile.read_text() == "x" and list(adir.iterdir()) == []


def _sweep_file(folder: Path, *, train: bool = False) -> Path:
    p = folder / "sweep.toml"
    p.write_text(f'[sweep]\ntable = "t"\ntitle = "t"\ncolumns = ["c"]\ntrain = {str(train).lower()}\n'
                 '[[variants]]\nname = "a"\nlabels = ["x"]\n')
    return p


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_output_folder(s: dict[str, Path], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", ro / "r"),
                "not writable")
        refused(cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", s["run"] / "ckpt.pt",
                    "--out", ro / "res.json"), "not writable")
        refused(cli("cache", "--detector", fd.NAME, "--checkpoint", s["fake"], "--coco", s["coco"], "--split",
                    "val2017", "--out", ro / "store", "--workers", "0"), "not writable")
        refused(cli("predict", s["coco"] / "val2017", "--detector", fd.NAME, "--checkpoint", s["fake"],
                    "--masknet", s["run"] / "ckpt.pt", "--out", ro / "p"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_cache_on_a_complete_read_only_store_has_nothing_to_do(s: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(s["val"], store)
    before = _snapshot(store)
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        r = cli("cache", "--detector", fd.NAME, "--checkpoint", s["fake"], "--coco", s["coco"], "--split",
                "val2017", "--out", store, "--workers", "0", "--no-progress", "--topk", "8")
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: 0 images this run" in r.stdout + r.stderr and "3 done, 0 skipped, 0 pending" in r.stdout + r.stderr
    assert _snapshot(store) == before
