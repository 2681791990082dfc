"""The ``mfdetr train`` / ``eval`` / ``sweep`` / ``plot`` commands on a tiny cache, and their errors (in this
process; torchrun and SIGKILL + resume in real processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests._fake_detector as fd
from tests.conftest import assert_user_error, cli
from tests._fake_detector import make_oracle, write_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fd.register()
    root = tmp_path_factory.mktemp("cli")
    coco = root / "coco"
    fd.make_coco(coco, n=4, split="train2017")
    fd.make_coco(coco, n=3, split="val2017", seed=1)
    ckpt = fd.save_fake_checkpoint(root / "fake.pth")
    for split in ("train2017", "val2017"):
        make_oracle(write_cache(coco, split, root / split, ckpt), coco / "annotations" / f"instances_{split}.json")
    cfg = fd.write_run_config(
        root / "tiny.toml", device="cpu", iterations=4, batch_size=2, log_every=2, num_workers=0, lr=1e-3
    )
    return {"root": root, "coco": coco, "train": root / "train2017", "val": root / "val2017", "cfg": cfg}


@pytest.mark.slow
def test_train_eval_plot_commands(setup: dict[str, Path]) -> None:
    run = setup["root"] / "run"
    p = cli(
        "train",
        "--cache",
        setup["train"],
        "--coco",
        setup["coco"],
        "--val-cache",
        setup["val"],
        "--config",
        setup["cfg"],
        "--out",
        run,
        "train.iterations=6",
        "train.progress=false",
    )
    assert p.returncode == 0, p.stderr
    assert "global batch 2 (2 x 1), lr 0.001" in p.stderr and "bbox     100.00" in p.stderr
    assert json.loads((run / "config.json").read_text())["train"]["iterations"] == 6
    p = cli(
        "eval",
        "--cache",
        setup["val"],
        "--coco",
        setup["coco"],
        "--checkpoint",
        run / "ckpt.pt",
        "--out",
        setup["root"] / "res.json",
    )
    assert p.returncode == 0, p.stderr
    assert "iou_type" in p.stdout and "segm" in p.stdout and json.loads((setup["root"] / "res.json").read_text())
    rows = {ln.split()[0]: ln.split()[1:] for ln in p.stdout.splitlines() if ln.split()[:1] in (["segm"], ["boundary"])}
    fast = cli(
        "eval",
        "--cache",
        setup["val"],
        "--coco",
        setup["coco"],
        "--checkpoint",
        run / "ckpt.pt",
        "--evaluator",
        "faster",
    )
    assert fast.returncode == 0, fast.stderr
    fast_rows = {
        ln.split()[0]: ln.split()[1:] for ln in fast.stdout.splitlines() if ln.split()[:1] in (["segm"], ["boundary"])
    }
    assert set(rows) == {"segm", "boundary"} and fast_rows == rows  # same numbers from either evaluator
    p = cli("plot", run)
    assert p.returncode == 0 and Path(p.stdout.strip()).is_file()


@pytest.mark.slow
def test_cli_bad_input_is_one_line(setup: dict[str, Path]) -> None:
    assert_user_error(
        cli(
            "train",
            "--cache",
            setup["train"],
            "--coco",
            setup["coco"],
            "--config",
            setup["cfg"],
            "--out",
            setup["root"] / "bad1",
            "masknet.image_encoder.depth=3",
        ),
        "unknown key",
        "depth",
    )


@pytest.mark.slow
def test_torchrun_mfdetr_train_two_processes(setup: dict[str, Path]) -> None:
    import subprocess
    import sys

    from tests.conftest import cli_env

    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    run = setup["root"] / "ddp"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mfdetr",
            "train",
            "--cache",
            str(setup["train"]),
            "--coco",
            str(setup["coco"]),
            "--config",
            str(setup["cfg"]),
            "--out",
            str(run),
            "train.batch_size=1",
            "train.progress=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr.count("global batch 2 (1 x 2), lr 0.001") == 1  # reported once, by rank 0
    rj = json.loads((run / "run.json").read_text())
    assert (rj["world_size"], rj["backend"], rj["global_batch"]) == (2, "gloo", 2)
    from mfdetr.engine import read_jsonl

    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 and all(v == v and v >= 0 for v in losses)  # 4 iterations, a record every 2


@pytest.mark.slow
def test_sigkill_real_mfdetr_train_then_resume_equals_uninterrupted(
    setup: dict[str, Path], tmp_path: Path, cli_threads: int
) -> None:
    """Kill a real ``mfdetr train`` with SIGKILL mid-run, resume it: the losses equal an uninterrupted run's.

    To kill it at a known point without any hook in the library, the cache chunk of the image that
    step 4 needs is swapped for a named pipe: reading it blocks, so the process stops right after
    logging step 3 (its last checkpoint is at step 2) and waits there until it is killed.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import zarr

    from mfdetr.cache.store import chunk_path
    from mfdetr.engine import EpochPlan, read_jsonl
    from tests.conftest import cli_env

    args = [
        "train",
        "--cache",
        setup["train"],
        "--coco",
        setup["coco"],
        "--config",
        setup["cfg"],
        "train.iterations=7",
        "train.batch_size=1",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.progress=false",
    ]
    # the reference and the resume need no process of their own (cli_threads: the killed process's thread count)
    ref = tmp_path / "ref"
    p = cli(*args, "--out", ref)
    assert p.returncode == 0, p.stderr

    order = EpochPlan(num_items=4, batch_size=1, seed=42).order(0)  # the run's data order (4 images, seed 42)
    chunk = chunk_path(setup["train"], zarr.open_group(str(setup["train"]), mode="r")["queries"], order[3])
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
        )
        deadline = time.time() + 300
        while not any(r.get("step") == 3 for r in read_jsonl(run / "metrics.jsonl")):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.time() < deadline, "mfdetr train never reached step 3"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        chunk.unlink()
        chunk.write_bytes(saved)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(json.dumps(read_jsonl(run / "metrics.jsonl")))[-1]["step"] == 3

    p = cli("train", "--cache", setup["train"], "--coco", setup["coco"], "--out", run, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming at step 2" in p.stderr
    a = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(ref / "metrics.jsonl") if r["kind"] == "train"]
    b = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [s for s, _, _ in a] == list(range(1, 8)) and a == b
    # each launch wrote its own TensorBoard file; together they cover every step
    from mfdetr.engine import read_scalars

    files = sorted((run / "tb").iterdir())
    assert len(files) == 2
    assert {s for f in files for s, tag, _ in read_scalars(f) if tag == "train/loss"} == set(range(1, 8))
