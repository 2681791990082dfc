"""How a training run stops. Ctrl-C: a real ``mfdetr train`` process interrupted with SIGINT prints
``interrupted`` and the command that resumes, exits 130 and leaves a checkpoint at the interrupt, from
which ``--resume`` finishes with the losses of an uninterrupted run; a SIGINT during a step takes effect
only once the step is complete. A non-finite loss stops the run naming the step and the images, keeping
the last good checkpoint; non-finite weights are never saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tests._fake_detector as fd
from tests.conftest import cli, cli_env, logged_losses
from tests._fake_detector import write_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fd.register()
    root = tmp_path_factory.mktemp("interrupt")
    coco = root / "coco"
    fd.make_coco(coco, n=4, split="train2017")
    cache = write_cache(coco, "train2017", root / "c_train", fd.save_fake_checkpoint(root / "fake.pth"))
    cfg = fd.write_run_config(
        root / "tiny.toml",
        device="cpu",
        iterations=4,
        batch_size=1,
        log_every=1,
        num_workers=0,
        progress=False,
        lr=1e-3,
        checkpoint_every=100,
    )
    return {"root": root, "coco": coco, "cache": cache, "cfg": cfg}


_losses = logged_losses


def default_sigint() -> None:
    """In a child about to run ``mfdetr``: SIGINT at its default disposition. A test process started in the
    background of a non-interactive shell (as CI may be) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_real_mfdetr_train_checkpoints_and_resumes(
    setup: dict[str, Path], tmp_path: Path, cli_threads: int
) -> None:
    """The image step 2 needs is swapped for a named pipe, so the process waits there (after logging step
    1) until SIGINT arrives; the pipe is then fed so that the reader thread can finish too. The reference
    run and the resume run in this process (with the interrupted process's thread count)."""
    import zarr

    from mfdetr.cache.store import chunk_path
    from mfdetr.engine import EpochPlan, read_jsonl

    args = ["train", "--cache", setup["cache"], "--coco", setup["coco"], "--config", setup["cfg"]]
    ref = tmp_path / "ref"
    p = cli(*args, "--out", ref)
    assert p.returncode == 0, p.stderr

    order = EpochPlan(num_items=4, batch_size=1, seed=42).order(0)
    chunk = chunk_path(setup["cache"], zarr.open_group(str(setup["cache"]), mode="r")["queries"], order[1])
    saved = chunk.read_bytes()
    chunk.unlink()
    os.mkfifo(chunk)
    run = tmp_path / "run"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mfdetr", *map(str, args), "--out", str(run)],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        deadline = time.time() + 300
        while not any(r.get("step") == 1 for r in read_jsonl(run / "metrics.jsonl")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "mfdetr train never logged step 1"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        while not (run / "ckpt.pt").exists():
            assert proc.poll() is None or (run / "ckpt.pt").exists(), proc.communicate()[1]
            assert time.time() < deadline, "no checkpoint at the interrupt"
            time.sleep(0.1)
        with open(chunk, "wb") as f:  # unblock the reader thread (the process waits for it at exit)
            f.write(saved)
        _, err = proc.communicate(timeout=120)
    finally:
        chunk.unlink()
        chunk.write_bytes(saved)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("mfdetr: interrupted")]
    assert len(line) == 1 and "at step 1" in line[0] and line[0].endswith("--resume"), err
    assert f"--out {run}" in line[0]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1

    p = cli("train", "--cache", setup["cache"], "--coco", setup["coco"], "--out", run, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming at step 1" in p.stderr
    assert [s for s, _, _ in _losses(ref)] == [1, 2, 3, 4] and _losses(run) == _losses(ref)


def test_sigint_during_a_step_lands_after_it(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SIGINT sent from inside step 2's loss: step 2 completes, the checkpoint is at step 2, and the
    resumed run ends with the weights of an uninterrupted one."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        # a test process started in the background of a non-interactive shell ignores SIGINT: give it
        # Python's default handler for this test, as an interactive `mfdetr` has
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    from mfdetr.engine import build_run_config, seed_everything, train
    from mfdetr.errors import Interrupted
    from tests._toy_engine import ToyCriterion, ToyDataset, ToyMaskNet

    cfg = build_run_config(
        {
            "train": {
                "device": "cpu",
                "progress": False,
                "log_every": 1,
                "num_workers": 0,
                "iterations": 4,
                "batch_size": 2,
            }
        }
    )
    base = ToyCriterion()
    calls = {"n": 0}

    def crit(out: Any, det: Any, targets: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return base(out, det, targets)

    def run(out: Path, criterion: Any, resume: bool = False) -> ToyMaskNet:
        seed_everything(cfg.train.seed)
        model = ToyMaskNet()
        train(cfg=cfg, model=model, criterion=criterion, train_set=ToyDataset(6), run_dir=out, resume=resume)
        return model

    ref = run(tmp_path / "ref", base)
    with pytest.raises(Interrupted) as info:
        run(tmp_path / "cut", crit)
    assert info.value.step == 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 2
    resumed = run(tmp_path / "cut", base, resume=True)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["launches"][1]["start_step"] == 2


def test_an_interrupt_or_os_error_in_any_command_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever command is running: Ctrl-C → ``interrupted`` + the same command to rerun, exit 130;
    an OSError about a file (e.g. permission denied mid-run) → one error line naming it, exit 2."""
    from typer.testing import CliRunner

    import mfdetr.cache.run as cache_run
    from mfdetr.cli import app

    def interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_run, "run_cache", interrupted)
    fd.register()
    ckpt = fd.save_fake_checkpoint(tmp_path / "x.pth")  # the command resolves detector and weights first
    args = [
        "cache",
        "--detector",
        fd.NAME,
        "--checkpoint",
        str(ckpt),
        "--coco",
        str(tmp_path),
        "--out",
        str(tmp_path / "store"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130 and "Traceback" not in r.output
    assert r.stderr.strip() == "mfdetr: interrupted; to continue run: mfdetr " + " ".join(args)

    def denied(*a: Any, **k: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "store" / "zarr.json"))

    monkeypatch.setattr(cache_run, "run_cache", denied)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    assert r.stderr.strip() == f"mfdetr: error: {tmp_path / 'store' / 'zarr.json'}: Permission denied"


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    from mfdetr.engine import build_run_config, seed_everything, train
    from mfdetr.errors import MfdetrError
    from tests._toy_engine import ToyCriterion, ToyDataset, ToyMaskNet

    calls = {"n": 0}
    base = ToyCriterion()

    def crit(out: Any, det: Any, targets: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        losses = base(out, det, targets)
        return {**losses, "total": losses["total"] * (float("nan") if calls["n"] == 3 else 1.0)}

    cfg = build_run_config(
        {
            "train": {
                "device": "cpu",
                "progress": False,
                "log_every": 1,
                "num_workers": 0,
                "iterations": 5,
                "batch_size": 2,
                "checkpoint_every": 2,
            }
        }
    )
    seed_everything(cfg.train.seed)
    with pytest.raises(MfdetrError, match=r"non-finite loss at step 3 on image ids \[\d+, \d+\].*last good"):
        train(cfg=cfg, model=ToyMaskNet(), criterion=crit, train_set=ToyDataset(6), run_dir=tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    """A finite loss whose gradient is NaN (sqrt at 0) poisons the weights: the checkpoint is refused."""
    from mfdetr.engine import build_run_config, seed_everything, train
    from mfdetr.errors import MfdetrError
    from tests._toy_engine import ToyCriterion, ToyDataset, ToyMaskNet

    base = ToyCriterion()

    def crit(out: Any, det: Any, targets: Any) -> dict[str, torch.Tensor]:
        losses = base(out, det, targets)
        return {**losses, "total": losses["total"] + torch.sqrt((out["mask_logits"].sum() * 0).abs())}

    cfg = build_run_config(
        {
            "train": {
                "device": "cpu",
                "progress": False,
                "log_every": 1,
                "num_workers": 0,
                "iterations": 3,
                "batch_size": 2,
                "checkpoint_every": 1,
            }
        }
    )
    seed_everything(cfg.train.seed)
    with pytest.raises(MfdetrError, match="non-finite weights after step 1 .*not saved"):
        train(cfg=cfg, model=ToyMaskNet(), criterion=crit, train_set=ToyDataset(6), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_sigint_real_mfdetr_cache_then_rerun_equals_uninterrupted(tmp_path: Path, cli_threads: int) -> None:
    """Ctrl-C a real ``mfdetr cache`` while the detector works on its third image (of 4): exit 130 with the command
    to rerun; rerunning it completes the store, identical to an uninterrupted one."""
    import tests._held_detector as held

    coco = tmp_path / "coco"
    fd.make_coco(coco, n=4, split="val2017")
    ckpt = fd.save_fake_checkpoint(tmp_path / "fake.pth")
    env = {**cli_env(), "MFDETR_PLUGINS": "tests._held_detector"}
    args = [
        "cache",
        "--detector",
        held.NAME,
        "--checkpoint",
        str(ckpt),
        "--coco",
        str(coco),
        "--split",
        "val2017",
        "--topk",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]
    ref = cli(*args, "--out", tmp_path / "ref", env={"MFDETR_PLUGINS": env["MFDETR_PLUGINS"]})  # in this process
    assert ref.returncode == 0, ref.stderr
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfdetr", *args, "--out", str(store)],
        env={**env, held.HOLD_ENV: "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
        text=True,
    )
    deadline = time.time() + 300
    commits = store / "commit" / "c"
    while not (commits.is_dir() and len(list(commits.iterdir())) >= 2):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "mfdetr cache never committed two images"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("mfdetr: interrupted")]
    assert len(line) == 1 and line[0].endswith(f"--out {store}") and "mfdetr cache --detector" in line[0], err
    p = cli(*args, "--out", store, env={"MFDETR_PLUGINS": env["MFDETR_PLUGINS"]})  # the rerun, in this process
    assert p.returncode == 0, p.stderr
    assert "done: 2 images this run" in p.stdout and "4 done, 0 skipped, 0 pending" in p.stdout
    fd.assert_same_store(tmp_path / "ref", store)
