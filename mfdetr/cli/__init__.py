"""The ``mfdetr`` command line (a typer app). Commands hold no logic: they call library functions.

Each command group lives in a module ``mfdetr/cli/cmd_<name>.py`` exposing ``register(app)``; modules
are discovered in sorted order, so adding a command never touches this file. A user mistake raises
:class:`mfdetr.errors.MfdetrError`, which :func:`main` prints as one line (``mfdetr: error: ...``) with
exit status 2 — never a traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys

import typer

from mfdetr import __version__
from mfdetr.errors import MfdetrError

app = typer.Typer(
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
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Mask Frozen-DETR: cache a frozen DETR detector once, train a light mask network on the cache."""


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}").register(app)


_discover()


def one_line(message: str) -> str:
    """The user-facing line of an error message. An error raised inside a DataLoader worker reaches the
    main process re-raised by torch with the worker's traceback in its message: keep its last line, the
    original message, without the exception's class name."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MfdetrError as e:
        typer.echo(f"mfdetr: error: {one_line(str(e))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("mfdetr: interrupted", err=True)
        sys.exit(130)
