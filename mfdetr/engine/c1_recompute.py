"""Stage 2 over a ``--c1 recompute`` cache: C1 recomputed from the image by the stage 0 the cache carries.

Split between the two sides of the DataLoader:

- in the workers, :class:`ImageSource` reads the image file the cache was written from, checks its
  sha256 against the store's ``image_sha256``, decodes it and applies the manifest's preprocessing
  (:class:`mfdetr.data.transforms.EvalTransform`: exactly the detector's input tensor). The image
  travels in ``det.extras["c1_image"]``; a missing or changed file travels as a message in
  ``det.extras["c1_image_error"]`` (an exception raised in a worker would reach the user as a
  traceback), and is raised as a one-line :class:`MfdetrError` naming the file by :class:`C1Recompute`;
- in the training process, :class:`C1Recompute` (the trainer's ``prepare_batch``, also used by
  evaluation) runs the stored stage 0 (:class:`mfdetr.cache.stage0.Stage0Program`) on the training
  device, frozen, under ``torch.inference_mode`` and in float32 (outside autocast), one image at a time
  as the cache writer's detector ran it, cuts C1 to ``ceil(input_hw / 4)``, rounds it to float16 (the
  value ``--c1 store`` would have stored) and zero-pads it to the batch like the reader + collate do.

Never imports a detector: the stage 0 is data in the store.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mfdetr.cache import CacheStore
from mfdetr.contracts import Preprocessing
from mfdetr.engine.collate import Stage2Batch, _cat_padded
from mfdetr.errors import MfdetrError, SkipImage

IMAGE_KEY, ERROR_KEY = "c1_image", "c1_image_error"


class ImageSource:
    """The preprocessed network input of a cached image, read again from the COCO folder (workers).

    Args:
        store: the recompute store (its ``image_sha256`` and preprocessing).
        coco_split: the COCO split the cache was written from (``image_path(image_id)``).
    """

    def __init__(self, store: CacheStore, coco_split: Any) -> None:
        from mfdetr.data.transforms import EvalTransform

        self.coco = coco_split
        self.transform = EvalTransform(preprocessing=Preprocessing.from_dict(store.manifest["preprocessing"]))

    def load(
        self, store: CacheStore, index: int, image_id: int, input_hw: tuple[int, int]
    ) -> tuple[Tensor | None, str | None]:
        """``(image [3, h, w] float32, None)``, or ``(None, one-line error naming the file)``."""
        from mfdetr.data.images import load_rgb

        path = self.coco.image_path(image_id)
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, (
                f"{path}: cannot read the image ({e.strerror}); a --c1 recompute cache decodes every "
                "image again (pass --coco DIR if the COCO folder moved)"
            )
        if hashlib.sha256(data).hexdigest() != store.image_sha256(index):
            return None, f"{path}: image file changed since the cache was written (sha256 differs from the cache's)"
        try:
            x = self.transform(load_rgb(path))
        except SkipImage as e:
            return None, str(e)
        if tuple(x.shape[1:]) != tuple(input_hw):
            return None, (
                f"{path}: preprocessed to {tuple(x.shape[1:])}, the cache says {tuple(input_hw)} "
                "(preprocessing differs)"
            )
        return x, None


class C1Recompute:
    """``prepare_batch(batch, device)``: fill ``batch.det.c1`` from the images, move the batch to ``device``.

    Args:
        store: the recompute store whose stage 0 to run (loaded lazily on first use, on ``device``).
    """

    def __init__(self, store: CacheStore) -> None:
        self.path = store.path
        self.entry = dict(store.manifest["c1"]["stage0"])
        self._program: Any = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers never run stage 0: do not ship it
        return {"path": self.path, "entry": self.entry, "_program": None}

    def program(self, device: torch.device | str) -> Any:
        from mfdetr.cache.stage0 import load_stage0

        if self._program is None:
            self._program = load_stage0(self.path, self.entry)
        return self._program.to(device)

    def c1(self, images: list[Tensor], input_hw: Tensor, device: torch.device | str) -> Tensor:
        """C1 [B, C1, H1, W1] float16 on ``device``: per image, cut to ``ceil(input_hw / 4)``, zero-padded."""
        prog = self.program(device)
        maps = []
        for x, (h, w) in zip(images, input_hw.tolist(), strict=True):
            with torch.inference_mode():
                y = prog(x.to(device=device, dtype=torch.float32, non_blocking=True)[None])
                maps.append(y[..., : math.ceil(h / 4), : math.ceil(w / 4)].to(torch.float16))
        return _cat_padded(maps)  # outside inference mode: a normal tensor

    def __call__(self, batch: Stage2Batch, device: torch.device | str) -> Stage2Batch:
        det = batch.det
        extras = dict(det.extras)
        errors = [e for e in extras.pop(ERROR_KEY, []) if e]
        if errors:
            raise MfdetrError(errors[0])
        images = extras.pop(IMAGE_KEY, None)
        if images is None:
            raise ValueError("a --c1 recompute batch carries no images (not made by CacheDataset)")
        c1 = self.c1(list(images), det.input_hw, device)
        return Stage2Batch(det=replace(det, c1=c1, extras=extras), targets=batch.targets).to(device)


__all__ = ["ERROR_KEY", "IMAGE_KEY", "C1Recompute", "ImageSource"]
