"""The ``mfdetr`` command line (a typer app). Commands hold no logic: they call library functions.

Each command group lives in a module ``mfdetr/cli/cmd_<name>.py`` exposing ``register(app)``; modules
are discovered in sorted order, so adding a command never touches this file. A user mistake raises
:class:`mfdetr.errors.MfdetrError`, which :func:`main` prints as one line (``mfdetr: error: ...``) with
exit status 2 — never a traceback. Ctrl-C prints ``mfdetr: interrupted`` and the command that
continues the work (a training run that saved a checkpoint at the interrupt: the same command with
``--resume``), and exits with status 130. Both are handled by the command group itself, so the
console script, ``python -m mfdetr`` and an in-process ``typer.testing.CliRunner`` behave alike.
"""

from __future__ import annotations

import errno
import importlib
import pkgutil
import re
import shlex
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from mfdetr import __version__
from mfdetr.errors import Interrupted, MfdetrError


def one_line(message: str) -> str:
    """The user-facing line of an error message. An error raised inside a DataLoader worker reaches the
    main process re-raised by torch with the worker's traceback in its message: keep its last line, the
    original message, without the exception's class name."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def _one_line(text: str) -> str:
    return " ".join(one_line(text).split())


def continue_command(args: list[str], err: KeyboardInterrupt) -> str:
    """The command line that continues an interrupted command: ``--resume`` for a training run that
    saved a checkpoint at the interrupt, else the same command (caches and sweeps resume by rerunning)."""
    args = list(args)
    if isinstance(err, Interrupted) and args[:1] == ["train"] and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["mfdetr", *args])


class _Group(TyperGroup):
    """Prints a user error as one line (exit 2) and an interrupt as ``interrupted`` (exit 130)."""

    def invoke(self, ctx: Any) -> Any:
        argv = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except MfdetrError as e:
            typer.echo(f"mfdetr: error: {_one_line(str(e))}", err=True)
            ctx.exit(2)
        except OSError as e:
            if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write that hit a full disk
                typer.echo(f"mfdetr: error: {e.strerror} (free some space and rerun the same command)", err=True)
                ctx.exit(2)
            if e.filename is None:  # not about a file the user named: a programming error, keep its traceback
                raise
            typer.echo(f"mfdetr: error: {e.filename}: {_one_line(e.strerror or str(e))}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:
            where = f" at step {e.step} (checkpoint {e.checkpoint})" if isinstance(e, Interrupted) else ""
            typer.echo(f"mfdetr: interrupted{where}; to continue run: {continue_command(argv, e)}", err=True)
            ctx.exit(130)


app = typer.Typer(
    cls=_Group,
    name="mfdetr",
    help="Mask Frozen-DETR: cache a frozen DETR detector once, train a light mask network on the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mfdetr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Mask Frozen-DETR: cache a frozen DETR detector once, train a light mask network on the cache."""


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}").register(app)


_discover()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MfdetrError as e:  # raised outside a command (e.g. while parsing)
        typer.echo(f"mfdetr: error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("mfdetr: interrupted", err=True)
        sys.exit(130)
