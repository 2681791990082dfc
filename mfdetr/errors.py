"""User-facing errors.

A :class:`MfdetrError` is a user mistake or a bad input (missing file, malformed JSON, wrong cache):
the CLI prints its message on one line (``mfdetr: error: ...``) and exits with status 2, never a
traceback. Messages name the file and the problem. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import re
from pathlib import Path


class MfdetrError(Exception):
    """A clear, one-line, user-facing error."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)


class SkipImage(Exception):
    """Raised for a single bad image inside a run: the run records the reason and goes on."""

    def __init__(self, image: str | Path, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image = str(image)
        self.reason = reason


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after saving what resumes it (``checkpoint`` at ``step``)."""

    def __init__(self, *, step: int, checkpoint: str | Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step = step
        self.checkpoint = Path(checkpoint)


def load_failure(e: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed; a refused file (one that holds
    objects other than tensors and plain data) names the offending global."""
    text = str(e)
    found = re.search(r"(Unsupported global: GLOBAL \S+|got <class '[^']+'>)", text)
    if "Weights only load failed" in text and found:
        return (
            "refused: it holds objects other than tensors and plain data, and loading it could run code "
            f"({found.group(1)})"
        )
    detail = re.search(r"WeightsUnpickler error: *([^\n]+)", text)
    first = detail.group(1) if detail else (text.strip().splitlines() or [""])[0]
    return f"cannot read checkpoint ({type(e).__name__}: {first.strip()[:200]})"
