"""Category names of predictions: from a ``--categories`` file, the MaskNet run's record, or defaults."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mfdetr.data.coco_names import COCO_NAMES
from mfdetr.errors import MfdetrError

__all__ = ["COCO_NAMES", "category_names"]


def category_names(
    class_to_category: Sequence[int],
    *,
    recorded: Mapping[int, str] | None = None,
    categories_file: str | Path | None = None,
) -> dict[int, str]:
    """Name of every category id the head can output.

    Sources, first match wins per id: ``categories_file`` (a JSON list of ``{"id", "name"}`` or a COCO
    annotation file), the MaskNet checkpoint's record (the training annotation file's names), then
    COCO's names for a 91-slot COCO head, else ``"class <id>"``.

    Raises:
        MfdetrError: ``categories_file`` is unreadable or names none of the head's ids.
    """
    from mfdetr.detectors.categories import read_categories

    ids = sorted({int(c) for c in class_to_category if int(c) > 0})
    names: dict[int, str] = {}
    if categories_file is not None:
        names.update(read_categories(categories_file))
        if ids and not set(ids) & set(names):
            raise MfdetrError(
                f"names categories {sorted(names)[:8]}, none of the ids the detector head predicts "
                f"({ids[:8]}{'…' if len(ids) > 8 else ''})",
                path=categories_file,
            )
    for cid, n in (recorded or {}).items():
        names.setdefault(int(cid), n)
    fallback = COCO_NAMES if len(class_to_category) == 91 else {}
    return {i: names.get(i) or fallback.get(i) or f"class {i}" for i in ids}
