"""What the hostile run-command tests share: a code-executing checkpoint payload, the module set-up (tiny
caches, a run config, a trained run) and a folder snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tests._fake_detector as fd
from tests.conftest import cli
from tests._fake_detector import write_cache


class _Payload:
    """Unpickling this object opens (creates) ``marker``: any load that runs code from the file shows."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    torch.save(
        {
            "model": {"w": torch.zeros(1)},
            "step": 1,
            "config": {},
            "masknet_config": {},
            "meta": {"note": _Payload(marker)},
        },
        path,
    )
    return path


def make_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny caches of one detector, one of another, a val cache, a run config and a trained run."""
    fd.register()
    root = tmp_path_factory.mktemp("hostile")
    coco = root / "coco"
    fd.make_coco(coco, n=4, split="train2017")
    fd.make_coco(coco, n=3, split="val2017", seed=1)
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    other = fd.save_fake_checkpoint(root / "other.pth", seed=1)
    caches = {
        "train": write_cache(coco, "train2017", root / "c_train", ckpt),
        "val": write_cache(coco, "val2017", root / "c_val", ckpt),
        "train_other": write_cache(coco, "train2017", root / "c_train_other", other),
    }
    cfg = fd.write_run_config(
        root / "tiny.toml",
        device="cpu",
        iterations=2,
        batch_size=2,
        log_every=1,
        num_workers=0,
        progress=False,
        lr=1e-3,
    )
    run = root / "run"
    r = cli("train", "--cache", caches["train"], "--coco", coco, "--config", cfg, "--out", run)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "coco": coco, "fake": ckpt, "cfg": cfg, "run": run, **caches}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def sweep_file(folder: Path, *, train: bool = False) -> Path:
    """A one-variant sweep file (training the variant when ``train``)."""
    p = folder / "sweep.toml"
    p.write_text(
        f'[sweep]\ntable = "t"\ntitle = "t"\ncolumns = ["c"]\ntrain = {str(train).lower()}\n'
        '[[variants]]\nname = "a"\nlabels = ["x"]\n'
    )
    return p
