"""Output paths checked before any work: a wrong kind of path or an unwritable place is a one-line error.

:func:`check_output_dir` (a run folder, a cache store, a predictions folder) and
:func:`check_output_file` (a results JSON) run before a command computes anything, so a read-only
disk or a typo in ``--out`` is reported at once instead of after hours of work. Writability is
probed by creating (and removing) a temporary file in the nearest existing folder, which is what the
command will do; nothing else is created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mfdetr.errors import MfdetrError


def _nearest_existing(path: Path) -> Path:
    cur = path
    while not cur.exists() and cur != cur.parent:
        cur = cur.parent
    return cur


def _probe(folder: Path, path: Path, what: str) -> None:
    if not folder.is_dir():
        raise MfdetrError(f"{what}: {folder} is a file, not a folder", path=path)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".mfdetr-write-probe-")
    except OSError as e:
        reason = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else e.strerror
        raise MfdetrError(f"{what} is not writable ({reason}: {folder})", path=path) from None
    os.close(fd)
    os.unlink(name)


def check_output_dir(path: str | Path, *, what: str = "--out") -> Path:
    """``path`` must be a folder (or not exist yet, under a writable folder) that can be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MfdetrError(f"{what} must be a folder, but it is a file", path=p)
    _probe(_nearest_existing(p.absolute()), p, what)
    return p


def check_output_file(path: str | Path, *, what: str = "--out") -> Path:
    """``path`` must be a file name (not an existing folder) in a writable folder."""
    p = Path(path)
    if p.is_dir():
        raise MfdetrError(f"{what} names a file to write, but it is an existing folder", path=p)
    if p.exists() and not p.is_file():
        raise MfdetrError(f"{what} names a file to write, but it is not a regular file (a device or FIFO)", path=p)
    if p.exists() and not os.access(p, os.W_OK):
        raise MfdetrError(f"{what} is not writable (read-only file)", path=p)
    _probe(_nearest_existing(p.absolute().parent), p, what)
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path, *, what: str = "output", shared: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` to write; when the block ends normally it is renamed to ``path``
    (atomic), so no reader ever sees a half-written file under the name. On any failure the temporary
    file is removed; an I/O error (``OSError``, or the ``RuntimeError`` torch raises for a failed write)
    becomes a one-line error naming ``path``, instead of an ``OSError`` without a file name.

    ``shared``: other processes may write the same file at once (shards of one store), so each writes
    its own temporary file (the process id in its name); otherwise the name is fixed (``<name>.tmp``)
    and a file left by a killed run is overwritten by the next one.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a device or FIFO is never replaced by a regular file
        raise MfdetrError(f"cannot write the {what}: it is not a regular file", path=path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:160]
        raise MfdetrError(f"cannot write the {what} ({reason})", path=path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], *, what: str = "output", shared: bool = False
) -> None:
    """``write(f)`` into a binary file that takes the name ``path`` only once complete and on disk
    (:func:`atomic_path`): a full disk or an I/O error leaves no partial file under the name."""
    with atomic_path(path, what=what, shared=shared) as tmp, tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str, *, what: str = "file", shared: bool = False) -> None:
    """Write a UTF-8 text file atomically (:func:`atomic_write`)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data), what=what, shared=shared)


@contextlib.contextmanager
def exclusive_folder(path: str | Path, *, what: str = "--out") -> Iterator[Path]:
    """Hold the folder ``path`` (created if missing, removed again if left empty) for this command
    alone: a second command writing the same folder at the same time is refused with a one-line error
    instead of both writing into it. The hold ends with the block (or the process)."""
    p = check_output_dir(path, what=what)
    created = not p.exists()
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MfdetrError(
                f"another mfdetr command is writing this folder ({what}) now: wait for it to "
                "end or choose another folder",
                path=p,
            ) from None
        yield p
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty: a command refused before writing anything leaves nothing


__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "exclusive_folder",
    "check_output_dir",
    "check_output_file",
]
