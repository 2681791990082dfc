"""Views of a cache store: the original image and, optionally, its horizontal flip.

A store made with ``mfdetr cache --views orig,hflip`` holds, for every image, the detector's outputs
on the original image (view ``orig``: the arrays of schema v1, unchanged) and on the horizontally
flipped image (view ``hflip``: a second run of the detector on the flipped input, not flipped
features). Each extra view has its own copy of every per-image array, named ``<view>_<name>``
(``hflip_queries``, ``hflip_enc_layer4_level0``, ``hflip_commit`` …), with the same shape, chunking and
codecs; ``image_ids`` is shared. Every view has its own commit flags, written last per image and
view, so a view of an image is complete (or pending, or damaged) on its own.

The manifest lists the views in ``views`` (``["orig", "hflip"]``); a manifest without the field (every
store written before views existed, and every store made with the default ``--views orig``) holds
the original view only. The flipped view is the preprocessed image mirrored inside its valid
(unpadded) region, which is the preprocessing of the mirrored image file (the eval resize and the
normalisation commute with a horizontal flip).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mfdetr.errors import MfdetrError

ORIG, HFLIP = "orig", "hflip"
#: the views a store may hold, in their stored order
KNOWN_VIEWS = (ORIG, HFLIP)
#: arrays every view shares (not per image)
SHARED_ARRAYS = ("image_ids",)


def parse_views(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"orig,hflip"`` → ``("orig", "hflip")``: known, distinct, ``orig`` included, in stored order."""
    if text is None:
        return (ORIG,)
    items = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    unknown = [v for v in items if v not in KNOWN_VIEWS]
    if unknown or not items:
        raise MfdetrError(
            f"--views must be a comma-separated subset of {','.join(KNOWN_VIEWS)} that includes orig, got {text!r}"
        )
    if len(set(items)) != len(items) or ORIG not in items:
        raise MfdetrError(f"--views must name each view once and include orig, got {text!r}")
    return tuple(v for v in KNOWN_VIEWS if v in items)


def store_views(manifest: Mapping[str, Any]) -> list[str]:
    """The views a store holds (``["orig"]`` when the manifest has no ``views`` field)."""
    return list(manifest.get("views", [ORIG]))


def view_array_name(view: str, name: str) -> str:
    """The stored name of array ``name`` of ``view``."""
    return name if view == ORIG or name in SHARED_ARRAYS else f"{view}_{name}"


def base_name(stored: str) -> str:
    """The original view's name of a stored array (``hflip_commit`` → ``commit``)."""
    for view in KNOWN_VIEWS[1:]:
        if stored.startswith(f"{view}_"):
            return stored[len(view) + 1 :]
    return stored


def expand_views(base: Sequence[Any], views: Sequence[str]) -> list[Any]:
    """The array table of a store with ``views``: ``base`` (an :class:`~mfdetr.cache.schema.ArraySpec` list,
    the ``orig`` view) followed by every extra view's copy of the per-image arrays."""
    out = list(base)
    for view in views:
        if view != ORIG:
            out += [
                dataclasses.replace(s, name=view_array_name(view, s.name)) for s in base if s.name not in SHARED_ARRAYS
            ]
    return out


def check_views(manifest: Mapping[str, Any]) -> list[str]:
    """Problems of a manifest's ``views`` field beyond its JSON schema."""
    if "views" not in manifest:
        return []
    views = manifest["views"]
    if views[:1] != [ORIG] or len(set(views)) != len(views) or views != [v for v in KNOWN_VIEWS if v in views]:
        return [
            (
                f"manifest.views: {views} must start with 'orig' and name each view once, in the order "
                f"{list(KNOWN_VIEWS)}"
            )
        ]
    return []


def view_manifest_entry(views: Sequence[str]) -> dict[str, Any]:
    """The manifest fields of ``views``: none for the original view alone (as before views existed)."""
    return {} if tuple(views) == (ORIG,) else {"views": list(views)}


def combined_commit(flags: Sequence[np.ndarray]) -> np.ndarray:
    """One flag per image over all views: done (1) when every view is done, skipped (2) when every view
    is written and one is skipped, else the first view's flag that is neither (pending or damaged)."""
    out = np.asarray(flags[0], dtype=np.uint8).copy()
    for f in flags[1:]:
        f = np.asarray(f, dtype=np.uint8)
        written = np.isin(out, (1, 2))
        out = np.where(written & ~np.isin(f, (1, 2)), f, out)  # this view pending or damaged
        out = np.where(written & (f == 2), np.uint8(2), out)  # this view skipped
    return out


def read_all_commits(root_dir: str | Path, root: Any, manifest: Mapping[str, Any]) -> np.ndarray:
    """:func:`combined_commit` of every view's commit flags as stored under ``root_dir``."""
    from mfdetr.cache.chunk_files import read_commit_flags

    return combined_commit(
        [read_commit_flags(root_dir, root[view_array_name(v, "commit")]) for v in store_views(manifest)]
    )


def flip_batch(batch: Any) -> Any:
    """An :class:`~mfdetr.contracts.ImageBatch` whose every image is mirrored left-right inside its
    valid region (padding stays at the bottom/right, so the pad mask is unchanged)."""
    images = batch.images.clone()
    for b, (h, w) in enumerate(batch.input_hw.tolist()):
        images[b, :, :h, :w] = batch.images[b, :, :h, :w].flip(-1)
    return dataclasses.replace(batch, images=images)


__all__ = [
    "HFLIP",
    "KNOWN_VIEWS",
    "ORIG",
    "SHARED_ARRAYS",
    "base_name",
    "check_views",
    "combined_commit",
    "expand_views",
    "flip_batch",
    "parse_views",
    "read_all_commits",
    "store_views",
    "view_array_name",
    "view_manifest_entry",
]
