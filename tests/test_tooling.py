"""The linters CI runs: ruff (lint rules and formatting, configured in pyproject.toml) and the import contracts
(import-linter) that keep the floors: the mask network apart from the detectors, the cache reader free of detectors,
no import upward."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"{name} is not installed (it is in the test extra)"
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # lint-imports must analyse this tree's mfdetr
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_ruff_check_passes() -> None:
    p = _run(_tool("ruff"), "check", "--no-cache", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_format_leaves_the_tree_unchanged() -> None:
    p = _run(_tool("ruff"), "format", "--check", "--no-cache", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_import_contracts_are_kept() -> None:
    p = _run(_tool("lint-imports"), "--no-cache")
    assert p.returncode == 0, p.stdout + p.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", p.stdout)
    assert kept and int(kept.group(1)) >= 4, p.stdout  # every contract was found and checked


def test_opening_the_cache_package_imports_no_detector(fresh_imports: dict[str, list[str]]) -> None:
    assert fresh_imports["cache"] == []  # neither mfdetr.detectors nor the stage-1 job mfdetr.cache.run
