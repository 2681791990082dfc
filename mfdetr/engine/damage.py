"""Damaged cache images in stage 2: stop with the one-line error (default), or skip and record them.

A :class:`~mfdetr.engine.cache_data.CacheDataset` never raises for a damaged image inside a DataLoader
worker (torch would wrap the message in the worker's traceback): it hands the
:class:`~mfdetr.cache.verify.Damage` on with the batch, and :class:`DamagePolicy` decides in the main
process. For training the dataset substitutes the next intact image (the batch keeps its size and the
data order stays a function of the step) and lists the damage in ``det.extras["damaged"]``; for
evaluation it returns a :class:`DamagedItem`, which :func:`collate_marked` drops from the batch, so
the AP is computed over the intact images only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mfdetr.cache.verify import Damage, DamagedImage
from mfdetr.engine.collate import Stage2Batch, collate_detector_outputs

SKIP_FLAG = "--skip-damaged"


@dataclass(frozen=True)
class DamagedItem:
    """What a dataset item is when its image is damaged (evaluation)."""

    damage: Damage


def collate_marked(items: Sequence[Any]) -> tuple[Stage2Batch | None, list[Damage]]:
    """``collate_detector_outputs`` of the intact items (``None`` if none) and the damage of the others
    (an item ``None`` is an image the dataset skipped and reported itself, e.g. one that cannot be decoded)."""
    good = [it for it in items if it is not None and not isinstance(it, DamagedItem)]
    bad = [it.damage for it in items if isinstance(it, DamagedItem)]
    return (collate_detector_outputs(good) if good else None), bad


class DamagePolicy:
    """Stop at the first damaged image (``skip=False``), or record every damaged image once and go on.

    Args:
        skip: the ``--skip-damaged`` flag.
        log: where a skip is announced (default: stderr, ``mfdetr: warning: ...``).
    """

    def __init__(self, *, skip: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.skip = skip
        self.log = log or (lambda s: print(f"mfdetr: warning: {s}", file=sys.stderr, flush=True))
        self._seen: dict[tuple[str, int], Damage] = {}

    def take(self, damages: Iterable[Damage]) -> None:
        """Raise :class:`DamagedImage` for the first damage (default), or record it (``skip``)."""
        for d in damages:
            if not self.skip:
                raise DamagedImage(d)
            key = (d.store, d.index)
            if key not in self._seen:
                self._seen[key] = d
                self.log(f"{d.store}: skipping damaged {d.describe()} ({SKIP_FLAG})")

    @property
    def skipped(self) -> list[Damage]:
        """Every damaged image recorded so far (first seen first)."""
        return list(self._seen.values())

    def skipped_in(self, store: str | Path) -> list[Damage]:
        return [d for d in self._seen.values() if d.store == str(store)]

    def preparer(
        self, then: Callable[[Stage2Batch, torch.device], Stage2Batch] | None = None
    ) -> Callable[[Stage2Batch, torch.device], Stage2Batch]:
        """The training loop's ``prepare_batch``: take the batch's damage, then ``then(batch, device)``
        (e.g. a ``--c1 recompute`` cache's C1 recomputation; default: move the batch to ``device``)."""

        def prepare(batch: Stage2Batch, device: torch.device) -> Stage2Batch:
            self.take(batch.det.extras.pop("damaged", []))
            return then(batch, device) if then is not None else batch.to(device)

        return prepare

    def prepare_batch(self, batch: Stage2Batch, device: torch.device) -> Stage2Batch:
        """:meth:`preparer` with the default: take the batch's damage, then move it to ``device``."""
        return self.preparer()(batch, device)

    def write(self, path: str | Path) -> None:
        """``path`` (JSON): the skipped images, one object each (store, index, image_id, array, problem)."""
        Path(path).write_text(json.dumps([asdict(d) for d in self.skipped], indent=2) + "\n")


__all__ = ["DamagePolicy", "DamagedItem", "SKIP_FLAG", "collate_marked"]
