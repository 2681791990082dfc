"""Shared test helpers: the CLI in this process (:func:`cli`) or in a real one (:func:`run_cli`), and
per-test isolation (seeded RNG; torch threads, SIGINT handler, environment and cwd restored)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    *args: str | os.PathLike, cwd: str | os.PathLike | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mfdetr ARGS`` (this checkout's package) and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "mfdetr", *map(str, args)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mfdetr {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli(
    *args: str | os.PathLike,
    env: Mapping[str, str | None] | None = None,
    cwd: str | os.PathLike | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``mfdetr ARGS`` in this process: typer's ``CliRunner`` on :data:`mfdetr.cli.app`, the command group
    that prints a user error as one ``mfdetr: error:`` line with exit 2 and an interrupt with exit 130,
    as the console script does. Returns what :func:`run_cli` returns; an exception that escapes the
    command group is written to ``stderr`` as a traceback (as a real process would print it) with exit 1.
    ``env`` sets (or, with ``None``, removes) variables for this call only; ``cwd`` likewise; ``check``
    turns a non-zero exit into an ``AssertionError`` showing the output."""
    from typer.testing import CliRunner

    from mfdetr.cli import app

    argv = [str(a) for a in args]
    with _chdir(cwd):
        res = CliRunner().invoke(app, argv, env=dict(env) if env else None)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(*res.exc_info))  # type: ignore[misc]
    proc = subprocess.CompletedProcess(["mfdetr", *argv], res.exit_code, res.stdout, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"mfdetr {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_output(*args: object) -> tuple[int, str]:
    """``(exit status, stdout + stderr)`` of :func:`cli` (a user error is its one ``mfdetr: error:`` line)."""
    proc = cli(*(str(a) for a in args))
    return proc.returncode, proc.stdout + proc.stderr


@contextlib.contextmanager
def _chdir(cwd: str | os.PathLike | None) -> Iterator[None]:
    if cwd is None:
        yield
        return
    old = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old)


def logged_losses(run: Path) -> list[tuple[int, float, float]]:
    """``(step, loss, lr)`` of every training record in a run's ``metrics.jsonl``."""
    from mfdetr.engine import read_jsonl

    return [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(Path(run) / "metrics.jsonl") if r["kind"] == "train"]


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user mistake: non-zero exit, a one-line ``mfdetr: error:`` message, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("mfdetr: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user mistake refused as the command group refuses one: exit status 2, exactly one
    ``mfdetr: error:`` line holding ``needles``, no traceback. Returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mfdetr: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def fake_plugin() -> Iterator[None]:
    """``MFDETR_PLUGINS`` names the fake detector (``tests/_fake_detector.py``) for a whole module, for
    commands run in this process and in real ones (``pytestmark = pytest.mark.usefixtures("fake_plugin")``)."""
    import tests._fake_detector as fd

    fd.register()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MFDETR_PLUGINS", "tests._fake_detector")
        yield


@pytest.fixture(scope="module")
def tiny_preset() -> Iterator[object]:
    """The tiny DINO training preset (:data:`tests._det_training_data.TINY`) registered for a whole module
    (``pytestmark = pytest.mark.usefixtures("tiny_preset")``), unregistered after it."""
    from mfdetr.detectors.registry import register_detector, unregister_detector
    from tests._det_training_data import TINY, tiny_train_preset

    def builder(**_: object) -> None:  # pragma: no cover - never built through the registry
        raise AssertionError

    preset = tiny_train_preset()
    register_detector(preset, builder)
    yield preset
    unregister_detector(TINY)


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny COCO-format folder, one per module (:func:`tests._det_training_data.write_toy_coco`)."""
    from tests._det_training_data import write_toy_coco

    return write_toy_coco(tmp_path_factory.mktemp("toycoco"))


#: groups of modules whose import must load no detector (nor the cache's stage-1 job), each imported in
#: turn into one fresh interpreter by :func:`fresh_imports`
IMPORT_PROBES: dict[str, tuple[str, ...]] = {
    "cache": ("mfdetr.cache", "mfdetr.cache.reader"),
    "remote_reader": (
        "mfdetr.cache.reader",
        "mfdetr.cache.location",
        "mfdetr.cache.readthrough",
        "mfdetr.engine.cache_data",
    ),
    "masknet": ("mfdetr.masknet", "mfdetr.masknet.complexity"),
}
_PROBED = ("mfdetr.detectors", "mfdetr.cache.run")


@pytest.fixture(scope="session")
def fresh_imports() -> dict[str, list[str]]:
    """Group of :data:`IMPORT_PROBES` → the modules under ``mfdetr.detectors`` / ``mfdetr.cache.run`` loaded
    once that group (and the groups before it) is imported into a fresh interpreter: one process for all
    groups. A group that loads none adds none, so a non-empty list is the first group that loaded one."""
    import json

    code = (
        "import importlib, json, sys\n"
        f"groups = {IMPORT_PROBES!r}\n"
        "seen = {}\n"
        "for name, mods in groups.items():\n"
        "    for m in mods:\n"
        "        importlib.import_module(m)\n"
        f"    seen[name] = sorted(m for m in sys.modules if m.startswith({_PROBED!r}))\n"
        "print(json.dumps(seen))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli_threads() -> int:
    """Compute in this process with the torch thread count of the processes :func:`run_cli` starts, so
    numbers from an in-process command and from a real process compare bit for bit (restored after the test)."""
    n = int(cli_env()["OMP_NUM_THREADS"])
    torch.set_num_threads(n)
    return n


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolate() -> Iterator[None]:
    """Whatever a test (or a command it runs in this process) changes of the process-wide state that
    later tests depend on is put back: torch's thread count and default dtype, the SIGINT handler, the
    environment and the working directory."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    sigint, cwd, env = signal.getsignal(signal.SIGINT), os.getcwd(), dict(os.environ)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    if signal.getsignal(signal.SIGINT) is not sigint:
        signal.signal(signal.SIGINT, sigint)
    if os.getcwd() != cwd:
        os.chdir(cwd)
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
