"""Hostile but realistic options to the run commands: out-of-range configs and seeds, a checkpoint without
its config, wrong or unwritable output paths, a wrong detector checkpoint. Each case: exit status 2 with exactly
one ``mfdetr: error:`` line and no side effect (see ``tests/test_hostile_runs.py``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import tests._fake_detector as fd
import tests._tiny_detector as tinydet
from tests.conftest import cli, refused
from tests._hostile_runs_setup import make_setup, snapshot, sweep_file


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory)


# ---- out-of-range settings and wrong paths ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=inf", "lr=inf"),
        ("train.lr=nan", "lr=nan"),
        ("train.lr=-1", "lr must lie in (0, 1]"),
        ("train.lr=1e39", "lr must lie in (0, 1]"),
        ("train.weight_decay=-5", "weight_decay"),
        ("train.weight_decay=nan", "weight_decay"),
        ("train.betas=[1.0, 0.9]", "betas"),
        ("train.betas=[0.9, nan]", "betas"),
        ("train.clip_grad_norm=-1", "clip_grad_norm"),
        ("train.clip_grad_norm=inf", "clip_grad_norm"),
        ("train.lr_drop_factor=nan", "lr_drop_factor"),
        ("train.lr_drop_factor=0", "lr_drop_factor"),
        ("train.lr_drop_factor=2", "lr_drop_factor"),
        ("train.num_workers=-1", "num_workers"),
        ("train.seed=-1", "seed"),
        ("train.iterations=-3", "iterations"),
        ("train.batch_size=0", "batch_size"),
        ("online.detector_lr_mult=nan", "detector_lr_mult"),
    ],
)
def test_out_of_range_config_is_one_line(s: dict[str, Path], tmp_path: Path, override: str, needle: str) -> None:
    out = tmp_path / "run"
    refused(
        cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", out, override), needle
    )
    assert not out.exists()


def test_negative_seeds_and_workers_of_other_commands(s: dict[str, Path], tmp_path: Path) -> None:
    refused(cli("synth", "--out", tmp_path / "synth", "--seed", "-5"), "--seed")
    cache = (
        "cache",
        "--detector",
        fd.NAME,
        "--checkpoint",
        s["fake"],
        "--coco",
        s["coco"],
        "--split",
        "val2017",
        "--out",
        tmp_path / "store",
    )
    refused(cli(*cache, "--workers", "-1"), "--workers")
    refused(cli(*cache, "--enc-layers", "9"), "--enc-layers")
    refused(cli(*cache, "--topk", "0"), "--topk")
    refused(cli(*cache, "--writer-threads", "0"), "--writer-threads")
    refused(
        cli(
            "predict",
            s["coco"] / "val2017",
            "--detector",
            fd.NAME,
            "--masknet",
            s["run"] / "ckpt.pt",
            "--out",
            tmp_path / "pred",
            "--workers",
            "-1",
        ),
        "--workers",
    )
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
    refused(
        cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", bad),
        "weights do not fit",
        f"missing 1: {dropped}",
        "unexpected 1: bogus.weight",
    )


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
    args = (
        "cache",
        "--detector",
        tinydet.NAME,
        "--coco",
        coco,
        "--split",
        "val2017",
        "--out",
        store,
        "--topk",
        "10",
        "--workers",
        "0",
        "--no-progress",
    )
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
    refused(
        cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", afile),
        "must be a folder",
    )
    refused(
        cli("eval", "--cache", s["val"], "--coco", s["coco"], "--checkpoint", s["run"] / "ckpt.pt", "--out", adir),
        "existing folder",
    )
    refused(
        cli(
            "cache",
            "--detector",
            fd.NAME,
            "--checkpoint",
            s["fake"],
            "--coco",
            s["coco"],
            "--split",
            "val2017",
            "--out",
            afile,
            "--workers",
            "0",
        ),
        "must be a folder",
    )
    refused(
        cli(
            "predict",
            s["coco"] / "val2017",
            "--detector",
            fd.NAME,
            "--checkpoint",
            s["fake"],
            "--masknet",
            s["run"] / "ckpt.pt",
            "--out",
            afile,
        ),
        "must be a folder",
    )
    refused(
        cli("sweep", sweep_file(tmp_path), "--cache", s["train"], "--val-cache", s["val"], "--out", afile),
        "must be a folder",
    )
    refused(
        cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", afile / "run"),
        "is a file, not a folder",
    )
    assert afile.read_text() == "x" and list(adir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_output_folder(s: dict[str, Path], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(
            cli("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", ro / "r"),
            "not writable",
        )
        refused(
            cli(
                "eval",
                "--cache",
                s["val"],
                "--coco",
                s["coco"],
                "--checkpoint",
                s["run"] / "ckpt.pt",
                "--out",
                ro / "res.json",
            ),
            "not writable",
        )
        refused(
            cli(
                "cache",
                "--detector",
                fd.NAME,
                "--checkpoint",
                s["fake"],
                "--coco",
                s["coco"],
                "--split",
                "val2017",
                "--out",
                ro / "store",
                "--workers",
                "0",
            ),
            "not writable",
        )
        refused(
            cli(
                "predict",
                s["coco"] / "val2017",
                "--detector",
                fd.NAME,
                "--checkpoint",
                s["fake"],
                "--masknet",
                s["run"] / "ckpt.pt",
                "--out",
                ro / "p",
            ),
            "not writable",
        )
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_cache_on_a_complete_read_only_store_has_nothing_to_do(s: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(s["val"], store)
    before = snapshot(store)
    modes = {p: p.stat().st_mode for p in [store, *store.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        r = cli(
            "cache",
            "--detector",
            fd.NAME,
            "--checkpoint",
            s["fake"],
            "--coco",
            s["coco"],
            "--split",
            "val2017",
            "--out",
            store,
            "--workers",
            "0",
            "--no-progress",
            "--topk",
            "8",
        )
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: 0 images this run" in r.stdout + r.stderr and "3 done, 0 skipped, 0 pending" in r.stdout + r.stderr
    assert snapshot(store) == before
