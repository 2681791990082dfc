"""Training on a cache that stores several views of each image (``mfdetr cache --views orig,hflip``).

:class:`ViewSampledDataset` is the training :class:`~mfdetr.engine.cache_data.CacheDataset` of such a
cache: every epoch, each image is read through one of the stored views, drawn uniformly and seeded by
``(run seed, epoch, store index)`` (:func:`choose_view`). The draw depends on nothing else, so a
resumed run (or one with DataLoader workers) reads the same views as an uninterrupted one; the
training loop calls :meth:`ViewSampledDataset.set_epoch` before every epoch. The GT of the flipped
view is flipped to match (:func:`mfdetr.data.flip.hflip_instances`, in the original image frame the
targets use), and a ``--c1 recompute`` cache recomputes C1 from the flipped image.

A view an image does not have complete (a skipped or pending flipped run) falls back to the original
view. Training samples among every view the cache holds (a cache of the original view alone trains
as before); evaluation always reads the original view (the plain :class:`CacheDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mfdetr.cache.verify import COMMIT_DONE
from mfdetr.cache.views import ORIG
from mfdetr.engine.cache_data import CacheDataset
from mfdetr.errors import MfdetrError

_VIEW_STREAM = 0x76696577  # separates these draws from other per-(seed, epoch, index) draws


def choose_view(seed: int, epoch: int, index: int, views: Sequence[str]) -> str:
    """The view store image ``index`` is read through in ``epoch`` (uniform over ``views``)."""
    if len(views) == 1:
        return views[0]
    rng = np.random.default_rng([int(seed), int(epoch), int(index), _VIEW_STREAM])
    return views[int(rng.integers(len(views)))]


class ViewSampledDataset(CacheDataset):
    """A :class:`CacheDataset` that reads each image through a view drawn per epoch (see the module doc).

    Args:
        views: the views to sample from (each stored in the cache).
        seed: the run seed.
        **kwargs: as :class:`CacheDataset`.
    """

    def __init__(self, *, views: Sequence[str], seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        missing = [v for v in views if v not in self.store.views]
        if missing or not views:
            raise MfdetrError(
                f"cache holds the views {self.store.views}, training asked for {list(views)}", path=self.store.path
            )
        self.views = list(views)
        self.seed = int(seed)
        self.epoch = 0
        self._complete = {v: self.store.for_view(v).commit_flags(refresh=True) == COMMIT_DONE for v in self.views}

    def set_epoch(self, epoch: int) -> None:
        """Views of epoch ``epoch`` from now on (the training loop calls this before each epoch)."""
        self.epoch = int(epoch)

    def view_of(self, i: int) -> str:
        index = int(self.indices[i])
        view = choose_view(self.seed, self.epoch, index, self.views)
        return view if self._complete[view][index] else ORIG


__all__ = ["ViewSampledDataset", "choose_view"]
