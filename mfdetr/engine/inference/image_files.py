"""The image files ``mfdetr predict`` is given: folders expanded, files preprocessed as a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mfdetr.contracts import DetectorPreset
from mfdetr.errors import SkipImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files to process (in argument order; a folder contributes its image files, sorted by
    name, not recursive) and the arguments that name nothing (``(path, reason)``)."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                missing.append((str(p), "folder holds no image files"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            missing.append((str(p), "missing image file"))
    return files, missing


class ImageFiles(Dataset[Any]):
    """Image files as preprocessed :class:`~mfdetr.data.CocoItem` (id = position + 1, no targets);
    an unreadable file raises :class:`SkipImage` (recorded by :func:`mfdetr.data.iterate_batches`)."""

    def __init__(self, files: Sequence[Path], *, preset: DetectorPreset) -> None:
        from mfdetr.data import EvalTransform

        self.files = list(files)
        self.image_ids = list(range(1, len(self.files) + 1))
        self.transform = EvalTransform(preprocessing=preset.preprocessing)

    def __len__(self) -> int:
        return len(self.files)

    def file_name(self, image_id: int) -> str:
        return str(self.files[image_id - 1])

    def image_info(self, image_id: int) -> dict[str, int]:
        """``{"height", "width"}`` from the file's header (0 × 0 when unreadable: the load reports it)."""
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():  # a huge header: refused (and reported) when it is loaded
                warnings.simplefilter("ignore")
                with Image.open(self.files[image_id - 1]) as im:
                    w, h = im.size
        except Exception:  # noqa: BLE001 - any unreadable file is reported when it is loaded
            return {"height": 0, "width": 0}
        return {"height": int(h), "width": int(w)}

    def __getitem__(self, index: int) -> Any:
        from mfdetr.data import CocoItem, load_rgb

        path = self.files[index]
        img = load_rgb(path)
        t = self.transform(img)
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise SkipImage(path, "image has no pixels")
        return CocoItem(
            image=t,
            image_id=index + 1,
            file_name=str(path),
            orig_hw=(img.height, img.width),
            input_hw=(int(t.shape[1]), int(t.shape[2])),
            target=None,
        )


__all__ = ["IMAGE_SUFFIXES", "ImageFiles", "expand_inputs"]
