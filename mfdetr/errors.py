"""User-facing errors.

A :class:`MfdetrError` is a user mistake or a bad input (missing file, malformed JSON, wrong cache):
the CLI prints its message on one line (``mfdetr: error: ...``) and exits with status 2, never a
traceback. Messages name the file and the problem. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

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
