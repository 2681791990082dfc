"""Shared test helpers: run the real CLI in a subprocess, seeded RNG."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_cli(*args: str | os.PathLike, cwd: str | os.PathLike | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mfdetr ARGS`` (this checkout's package) and capture its output."""
    proc = subprocess.run([sys.executable, "-m", "mfdetr", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mfdetr {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user mistake: non-zero exit, a one-line ``mfdetr: error:`` message, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("mfdetr: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
