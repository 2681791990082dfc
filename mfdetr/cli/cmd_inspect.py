"""``mfdetr inspect CACHE``: validate a cache store and print its manifest, completeness and arrays."""

from __future__ import annotations


import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        cache: str = typer.Argument(..., help="Cache store directory (made by `mfdetr cache`)."),
        max_skips: int = typer.Option(20, "--max-skips", min=0, help="Skipped (and damaged) images to list."),
        verify: bool = typer.Option(
            False,
            "--verify",
            help="Decode and check every committed image (checksums, "
            "finite values), not only its files and commit flag.",
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar of --verify."),
    ) -> None:
        """Validate a cache store and describe it; exit 2 with a one-line error if it is invalid or holds
        damaged images (listed: image id, array, problem)."""
        from mfdetr.cache.inspect import inspect_store
        from mfdetr.cache.verify import REPAIR_HINT
        from mfdetr.errors import MfdetrError

        lines, facts = inspect_store(cache, max_skips=max_skips, verify=verify, progress=progress)
        for line in lines:
            typer.echo(line)
        if facts["damaged"]:
            first = facts["damage"][0]
            raise MfdetrError(
                f"{facts['damaged']} damaged image(s), first {first.describe()}; {REPAIR_HINT}", path=cache
            )
