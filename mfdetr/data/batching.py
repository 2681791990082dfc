"""Batching: zero-pad preprocessed images into an :class:`~mfdetr.contracts.ImageBatch`; record skips.

- :func:`collate` pads every image at the bottom/right to the largest (H, W) of the batch (optionally
  rounded up to a multiple of ``size_divisibility``), as DETR's ``nested_tensor_from_tensor_list``;
  ``pad_mask`` is True at padding.
- :class:`SkipSafe` wraps a dataset so that a bad image yields a :class:`SkipRecord` instead of an
  exception (safe inside DataLoader workers); :func:`collate_with_skips` splits a list of
  items/records into ``(batch or None, skips)``; :func:`iterate_batches` runs a split that way.
- :class:`SkipReplace` (training) puts the next loadable image in place of a bad one, reporting it.
- :func:`run_or_skip` runs a network on a batch and, where it fails, on each image alone, so that an
  image the network cannot process (e.g. a one-pixel-wide input) is skipped with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from mfdetr.contracts import ImageBatch
from mfdetr.data.coco import CocoItem
from mfdetr.errors import SkipImage


@dataclass(frozen=True)
class SkipRecord:
    """A recorded skip: which image and why (picklable, JSON-friendly via :meth:`to_dict`)."""

    index: int
    image_id: int | None
    file_name: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "image_id": self.image_id, "file_name": self.file_name, "reason": self.reason}


def collate(items: Sequence[CocoItem], *, size_divisibility: int = 1) -> ImageBatch:
    """Pad items into an :class:`ImageBatch` (images ``[B, 3, Hp, Wp]``, padding zeros bottom/right).

    ``targets`` is the list of GT instances when every item has one, else ``None``.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    hp = max(int(it.image.shape[1]) for it in items)
    wp = max(int(it.image.shape[2]) for it in items)
    if size_divisibility > 1:
        hp = -(-hp // size_divisibility) * size_divisibility
        wp = -(-wp // size_divisibility) * size_divisibility
    b = len(items)
    images = items[0].image.new_zeros(b, 3, hp, wp)
    pad_mask = torch.ones(b, hp, wp, dtype=torch.bool)
    for i, it in enumerate(items):
        h, w = it.image.shape[1:]
        images[i, :, :h, :w] = it.image
        pad_mask[i, :h, :w] = False
    targets = [it.target for it in items]
    return ImageBatch(
        images=images,
        pad_mask=pad_mask,
        input_hw=torch.tensor([list(it.input_hw) for it in items], dtype=torch.int64),
        orig_hw=torch.tensor([list(it.orig_hw) for it in items], dtype=torch.int64),
        image_ids=[it.image_id for it in items],
        file_names=[it.file_name for it in items],
        targets=None if any(t is None for t in targets) else targets,
    )  # type: ignore[arg-type]


class SkipSafe(Dataset[Any]):
    """Wrap a dataset whose ``__getitem__`` may raise :class:`SkipImage`: return a :class:`SkipRecord`.

    The wrapped dataset may expose ``image_ids`` and ``file_name(image_id)`` (as
    :class:`~mfdetr.data.coco.CocoInstances` does) so records name the image.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except SkipImage as e:
            ids = getattr(self.dataset, "image_ids", None)
            image_id = ids[index] if ids is not None else None
            name = (
                self.dataset.file_name(image_id)
                if image_id is not None and hasattr(self.dataset, "file_name")
                else e.image
            )
            return SkipRecord(index=index, image_id=image_id, file_name=name, reason=str(e))


class SkipReplace(Dataset[Any]):
    """Training view of a dataset whose ``__getitem__`` may raise :class:`SkipImage`: the next loadable
    item (index + 1, + 2, … cyclically) takes the bad one's place, so batches keep their size and the
    epoch plan stays a pure function of the seed. Each bad image is reported once per process on stderr
    (``mfdetr: skipped FILE: reason; ...``) and remembered, so it is not decoded again there.
    ``set_epoch`` is forwarded (per-epoch augmentation draws).

    Raises:
        MfdetrError: when no item of the dataset can be loaded.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Any:
        import sys

        from mfdetr.errors import MfdetrError

        n = len(self)
        for k in range(n):
            j = (int(index) + k) % n
            if j in self.bad:
                continue
            try:
                return self.dataset[j]
            except SkipImage as e:
                self.bad[j] = str(e)
                print(f"mfdetr: skipped {e}; training uses the next image in its place", file=sys.stderr)
        raise MfdetrError(f"no image of the training split can be loaded (first: {next(iter(self.bad.values()), '')})")


def collate_with_skips(
    items: Sequence[Any], *, size_divisibility: int = 1
) -> tuple[ImageBatch | None, list[SkipRecord]]:
    """Split ``items`` (from :class:`SkipSafe`) into a padded batch of the good ones and the skips."""
    skips = [it for it in items if isinstance(it, SkipRecord)]
    good = [it for it in items if not isinstance(it, SkipRecord)]
    return (collate(good, size_divisibility=size_divisibility) if good else None), skips


def same_size_batches(dataset: Any, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` of a dataset in batches of one network-input size (``dataset.image_info(id)`` gives
    ``height``/``width``, ``dataset.transform.output_hw`` the resize; order kept within a size; an
    image of unknown size, 0 × 0, is a batch alone), so no image of a batch is padded.

    DETR-family detectors are not padding-invariant (the input projection's GroupNorm and the
    convolutions near the border see the padding): batched this way, every image is detected exactly
    as if alone, which is how the official evaluation (batch 1) runs them.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        info = dataset.image_info(dataset.image_ids[i])
        h, w = int(info["height"]), int(info["width"])
        key = dataset.transform.output_hw(h, w) if h > 0 and w > 0 else (-1, -int(i) - 1)  # unknown: alone
        groups.setdefault(key, []).append(int(i))
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def iterate_batches(
    dataset: Dataset[Any],
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    size_divisibility: int = 1,
    batches: Sequence[Sequence[int]] | None = None,
) -> Iterator[tuple[ImageBatch | None, list[SkipRecord]]]:
    """Yield ``(batch or None, skips)`` over ``dataset`` (optionally only ``indices``), in order, or
    over the given ``batches`` of dataset indices (e.g. :func:`same_size_batches`).

    A batch whose every image was skipped comes back as ``(None, skips)``; callers record the skips.
    """
    safe: Dataset[Any] = SkipSafe(dataset)
    collate_fn = partial(collate_with_skips, size_divisibility=size_divisibility)
    if batches is not None:
        loader = DataLoader(
            safe,
            batch_sampler=[list(b) for b in batches],
            num_workers=num_workers,
            collate_fn=collate_fn,
            persistent_workers=False,
        )
        yield from loader
        return
    if indices is not None:
        safe = torch.utils.data.Subset(safe, list(indices))
    loader = DataLoader(
        safe,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )
    yield from loader


T = TypeVar("T")

#: what a network raises on an input it cannot process (a layer's shape check, an empty reduction, …)
RUN_FAILURES = (ValueError, RuntimeError, IndexError, ZeroDivisionError)


def single_image_batches(batch: ImageBatch) -> list[ImageBatch]:
    """Every image of ``batch`` as a batch of one, cut to its unpadded network-input size."""
    out = []
    for b in range(len(batch)):
        h, w = (int(v) for v in batch.input_hw[b].tolist())
        out.append(
            ImageBatch(
                images=batch.images[b : b + 1, :, :h, :w],
                pad_mask=batch.pad_mask[b : b + 1, :h, :w],
                input_hw=batch.input_hw[b : b + 1],
                orig_hw=batch.orig_hw[b : b + 1],
                image_ids=[batch.image_ids[b]],
                file_names=[batch.file_names[b]],
                targets=None if batch.targets is None else [batch.targets[b]],
            )
        )
    return out


def run_or_skip(
    fn: Callable[[ImageBatch], T], batch: ImageBatch
) -> tuple[list[tuple[ImageBatch, T]], list[tuple[int, str]]]:
    """``fn(batch)``; if that raises one of :data:`RUN_FAILURES`, ``fn`` on each image alone.

    Returns ``([(batch or single-image batch, result)], [(position in batch, reason)])``: the images
    ``fn`` cannot process are reported with the network-input size and the error, never raised.
    Out-of-memory errors are raised (they depend on the batch, not on the image).
    """

    def reason(one: ImageBatch, e: BaseException) -> str:
        h, w = (int(v) for v in one.input_hw[0].tolist())
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"the network cannot process this image (input {h}x{w}): {type(e).__name__}: {msg}"[:240]

    try:
        return [(batch, fn(batch))], []
    except torch.OutOfMemoryError:
        raise
    except RUN_FAILURES as e:
        if len(batch) == 1:
            return [], [(0, reason(batch, e))]
    done: list[tuple[ImageBatch, T]] = []
    failed: list[tuple[int, str]] = []
    for b, one in enumerate(single_image_batches(batch)):
        try:
            done.append((one, fn(one)))
        except torch.OutOfMemoryError:
            raise
        except RUN_FAILURES as e:
            failed.append((b, reason(one, e)))
    return done, failed
