"""Which dataset category each class slot of a detector head predicts.

A checkpoint tells how many class slots its head has and how its training numbered them: official DINO /
H-Deformable-DETR heads use the category id itself as the slot (slot ``i`` = id ``i``, ``num_classes`` >
the largest id), detrex (detectron2) counts the dataset's categories in sorted-id order (slot ``i`` = the
``i``-th smallest id). :func:`slot_map` matches the slots against the dataset's categories (or a
``--categories`` list) by that convention, then by count and order:

- official heads: the identity when every id is below the slot count (slots of ids that are not
  categories map to 0: no category, their detections are dropped); otherwise
- one slot per category (``C`` slots, ``C`` categories): slot ``i`` = the ``i``-th category; or
- a first, unused slot and one per category (``C`` slots, ``C - 1`` categories: a head trained on ids
  renumbered 1..N; not for detrex);
- anything else is a one-line error asking for ``--categories FILE`` (the categories of the slots, in
  order: a JSON list of ``{"id", "name"}`` or a COCO annotation file), and a ``--categories`` list that
  still disagrees with the dataset (a dataset category no slot predicts) is a one-line error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mfdetr.errors import MfdetrError

#: ``(id, name)`` pairs in the order a file lists them
Categories = list[tuple[int, str]]


def read_categories(path: str | Path, *, what: str = "categories file") -> Categories:
    """The categories a file lists: a JSON list of ``{"id", "name"}`` objects (in its order) or a COCO
    annotation file (its ``categories``, sorted by id).

    Raises:
        MfdetrError: missing file, not JSON, no such list, an entry without an integer ``id``, repeated ids.
    """
    p = Path(path)
    try:
        data: Any = json.loads(p.read_text())
    except FileNotFoundError:
        raise MfdetrError(f"{what} not found", path=p) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MfdetrError(f"not a readable JSON file ({type(e).__name__}: {e})", path=p) from None
    items = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise MfdetrError(
            'expected a non-empty JSON list of {"id", "name"} or a COCO annotation file with \'categories\'', path=p
        )
    out: Categories = []
    for i, c in enumerate(items):
        cid = c.get("id") if isinstance(c, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
            raise MfdetrError(f"categories[{i}] needs a non-negative integer 'id', got {c!r}", path=p)
        out.append((cid, str(c.get("name", f"class {cid}"))))
    ids = [c for c, _ in out]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise MfdetrError(f"category ids repeat: {dup}", path=p)
    return sorted(out) if isinstance(data, dict) else out


def _by_count(num_slots: int, ids: Sequence[int], *, contiguous: bool) -> tuple[int, ...] | None:
    if len(ids) == num_slots:
        return tuple(ids)
    if not contiguous and len(ids) == num_slots - 1 and 0 not in ids:
        return (0, *ids)
    return None


def _identity(num_slots: int, ids: Sequence[int]) -> tuple[int, ...] | None:
    known = set(ids)
    return tuple(i if i in known else 0 for i in range(num_slots)) if ids and max(ids) < num_slots else None


def _ids_text(ids: Sequence[int]) -> str:
    s = sorted(ids)
    return f"ids {s}" if len(s) <= 8 else f"ids {s[0]}..{s[-1]}"


def slot_map(
    num_slots: int,
    *,
    contiguous: bool,
    origin: str,
    dataset: Categories | None = None,
    dataset_path: str | Path | None = None,
    listed: Categories | None = None,
    listed_path: str | Path | None = None,
) -> tuple[int, ...] | None:
    """Slot → category id of a head with ``num_slots`` slots (``0`` = a slot of no category).

    Args:
        contiguous: the checkpoint numbers its slots 0..C-1 in sorted-id order (detrex); otherwise the
            official convention (slot = id) is tried first.
        origin: the checkpoint (named in errors).
        dataset, dataset_path: the categories of the command's annotation file.
        listed, listed_path: a ``--categories`` file's categories, in slot order.

    Returns:
        The map, or ``None`` when neither the dataset nor a list is given (the caller's default applies).
    """
    if listed is not None:
        ids = [c for c, _ in listed]
        found = _by_count(num_slots, ids, contiguous=contiguous) or (None if contiguous else _identity(num_slots, ids))
        if found is None:
            raise MfdetrError(
                f"lists {len(ids)} categories ({_ids_text(ids)}), {origin} has {num_slots} class "
                f"slots: give one category per slot, in slot order",
                path=listed_path,
            )
        if dataset is not None:
            missing = sorted({c for c, _ in dataset} - set(found))
            if missing:
                raise MfdetrError(
                    f"disagrees with the dataset {dataset_path}: its categories {_ids_text(missing)} "
                    f"are not among the {num_slots} class slots this file names",
                    path=listed_path,
                )
        return found
    if dataset is None:
        return None
    ids = sorted(c for c, _ in dataset)
    found = (None if contiguous else _identity(num_slots, ids)) or _by_count(num_slots, ids, contiguous=contiguous)
    if found is None:
        how = (
            "one slot per category, in sorted id order"
            if contiguous
            else "slot = category id, or one slot per category in sorted id order"
        )
        raise MfdetrError(
            f"{origin} has {num_slots} class slots, the dataset has {len(ids)} categories "
            f"({_ids_text(ids)}): they cannot be matched ({how}); name the category of each slot "
            "with --categories FILE",
            path=dataset_path,
        )
    return found


def dataset_categories(path: str | Path) -> Categories:
    """The categories of a COCO annotation file (sorted by id)."""
    return sorted(read_categories(path, what="annotation file"))


__all__ = ["Categories", "dataset_categories", "read_categories", "slot_map"]
