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
from tests._hostile_runs_setup import make_setup, snapshot, sweep_file, write_payload


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory)


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
        (
            "predict",
            image,
            "--detector",
            fd.NAME,
            "--checkpoint",
            s["fake"],
            "--masknet",
            evil,
            "--out",
            tmp_path / "pred1",
        ),
        (
            "predict",
            image,
            "--detector",
            tinydet.NAME,
            "--checkpoint",
            evil,
            "--masknet",
            tinydet_masknet,
            "--out",
            tmp_path / "pred2",
        ),
        ("train", "--cache", s["train"], "--coco", s["coco"], "--config", s["cfg"], "--out", resumed, "--resume"),
        (
            "cache",
            "--detector",
            tinydet.NAME,
            "--checkpoint",
            evil,
            "--coco",
            s["coco"],
            "--split",
            "val2017",
            "--topk",
            "10",
            "--out",
            store,
            "--workers",
            "0",
            "--no-progress",
        ),
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
    model = build_masknet(
        cfg, d_model=preset.hidden_dim, level_strides=preset.level_strides, c1_channels=preset.c1_channels
    )
    torch.save(
        {
            "masknet_config": to_dict(cfg),
            "model": model.state_dict(),
            "detector": tinydet.NAME,
            "class_to_category": list(preset.class_to_category),
        },
        path,
    )
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
    before = snapshot(run)
    line = refused(
        cli("train", "--cache", s[other], "--coco", s["coco"], "--out", run, "--resume"),
        "cannot resume with a different training cache",
        needle,
    )
    assert "(run) vs" in line
    assert snapshot(run) == before  # run.json keeps the recorded hash


def test_resume_refuses_another_cache_for_a_run_that_recorded_only_the_hash(s: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    del ck["meta"]["cache_manifest"]
    torch.save(ck, run / "ckpt.pt")
    refused(
        cli("train", "--cache", s["train_other"], "--coco", s["coco"], "--out", run, "--resume"),
        "different training cache",
        "manifest_sha256",
    )


def test_online_resume_refuses_another_detector_checkpoint(s: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "online"
    args = (
        "train",
        "--online",
        "--detector",
        fd.NAME,
        "--coco",
        s["coco"],
        "--split",
        "train2017",
        "--topk",
        "8",
        "--config",
        s["cfg"],
        "--out",
        run,
        "train.iterations=1",
    )
    r = cli(*args, "--checkpoint", s["fake"])
    assert r.returncode == 0, r.stdout + r.stderr
    before = snapshot(run)
    refused(
        cli(*args, "--checkpoint", s["root"] / "other.pth", "--resume"),
        "cannot resume with a different detector or training data",
        "checkpoint_sha256",
    )
    refused(cli(*args, "--checkpoint", s["fake"], "--resume", "--split", "val2017"), "split", "annotation_sha256")
    assert snapshot(run) == before


def test_sweep_resume_refuses_another_cache(s: dict[str, Path], tmp_path: Path) -> None:
    sweep = sweep_file(tmp_path, train=True)
    base = ["--val-cache", s["val"], "--coco", s["coco"], "--out", tmp_path / "out"]
    tiny = [f"masknet.{k}.{kk}={vv}" for k, v in TINY.items() if isinstance(v, dict) for kk, vv in v.items()]
    tiny += [f"masknet.{k}={v}" for k, v in TINY.items() if not isinstance(v, dict)]
    over = [
        'train.device="cpu"',
        "train.iterations=1",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.progress=false",
        *tiny,
    ]
    r = cli("sweep", sweep, "--cache", s["train"], *base, *over)
    assert r.returncode == 0, r.stdout + r.stderr
    # a finished variant is not reused for other inputs (another cache, another config)
    refused(
        cli("sweep", sweep, "--cache", s["train_other"], *base, *over),
        "variant a was run with other inputs",
        "sources.train_cache",
    )
    refused(cli("sweep", sweep, "--cache", s["train"], *base, *over, "train.lr=0.01"), "config.train.lr")
    assert cli("sweep", sweep, "--cache", s["train"], *base, *over, "train.num_workers=1").returncode == 0
    # an unfinished one is not resumed on another cache (here: the same settings, written again)
    (tmp_path / "out" / "a" / "result.json").unlink()
    time.sleep(1.0)  # the manifest records its creation time to the second
    again = write_cache(s["coco"], "train2017", tmp_path / "again", s["fake"])
    refused(cli("sweep", sweep, "--cache", again, *base, *over), "different training cache", "created_utc")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c: c.pop("optimizer"), "cannot restore the training state (KeyError"),
        (lambda c: c.update(step="two"), "cannot restore the training state (ValueError"),
        (lambda c: c["rng"][0].update(numpy=[1, 2]), "cannot restore the training state"),
        (lambda c: c["model"].pop(sorted(c["model"])[0]), "weights do not fit this run's model (missing 1:"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_one_line(
    s: dict[str, Path], tmp_path: Path, damage: Any, needle: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    damage(ck)
    ck["step"] = 1 if isinstance(ck["step"], int) else ck["step"]
    torch.save(ck, run / "ckpt.pt")
    refused(cli("train", "--cache", s["train"], "--coco", s["coco"], "--out", run, "--resume"), "ckpt.pt", needle)
