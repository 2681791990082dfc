"""DETR-family evaluation preprocessing: resize (shorter side S, longer side ≤ M), to [0, 1], normalise.

This is the ``val`` transform of Deformable-DETR / DINO / H-Deformable-DETR::

    T.Compose([T.RandomResize([S], max_size=M), T.ToTensor(), T.Normalize(mean, std)])

- The output size follows their ``get_size_with_aspect_ratio`` integer arithmetic exactly
  (:func:`resized_hw`): if the longer side would exceed ``M``, the target shorter side becomes
  ``int(round(M * short / long))`` (Python's round, i.e. round-half-to-even), and the longer side
  is then *truncated*: ``int(S' * long / short)``. An image whose shorter side already equals the
  target is left at its size. Where ``S'`` rounds to 0 (aspect ratio beyond ``2 M``) it becomes 1
  (:func:`resized_hw`), so every image keeps at least one pixel per side.
- The resize is ``torchvision.transforms.functional.resize`` on the **PIL** image, as the official
  code does: PIL's bilinear filter (PIL always antialiases when downscaling).
- ``ToTensor`` divides uint8 by 255; ``Normalize`` uses the mean/std of the preset's
  :class:`mfdetr.contracts.Preprocessing` (ImageNet by default).
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from mfdetr.contracts import Preprocessing


def resized_hw(h: int, w: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Network-input size ``(oh, ow)`` for an ``h × w`` image, by the official DETR rule.

    Mirrors ``get_size_with_aspect_ratio`` of Deformable-DETR's ``datasets/transforms.py``
    (same float/int arithmetic, same rounding), so our ``input_hw`` equals the official one, with one
    exception: where that rule rounds the short side to 0 (an aspect ratio beyond ``2 * max_size``,
    e.g. 3000 × 1 at M = 1333), the short side becomes 1 and the long side ``min(long / short,
    max_size)`` (truncated), instead of an empty image.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    size = short_side
    if max_size is not None:
        min_orig = float(min(w, h))
        max_orig = float(max(w, h))
        if max_orig / min_orig * size > max_size:
            size = int(round(max_size * min_orig / max_orig))
    if size < 1:  # an extreme aspect ratio (e.g. 3000 x 1 at M = 1333): the short side would round to 0
        short, long = 1, int(max(w, h) / min(w, h))
        if max_size is not None:
            long = min(long, max_size)
        return (long, short) if w < h else (short, long)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return oh, ow


class EvalTransform:
    """PIL RGB image → normalised float32 tensor ``[3, oh, ow]`` (the official eval preprocessing).

    Args:
        preprocessing: resize sizes and mean/std (a preset's :class:`Preprocessing`).
    """

    def __init__(self, *, preprocessing: Preprocessing | None = None) -> None:
        self.preprocessing = preprocessing or Preprocessing()
        self._mean = torch.tensor(self.preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.preprocessing.std, dtype=torch.float32).view(3, 1, 1)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Resized (unpadded) network-input size for an ``h × w`` image."""
        p = self.preprocessing
        return resized_hw(h, w, p.short_side, p.max_size)

    def __call__(self, image: Image.Image) -> Tensor:
        if image.mode != "RGB":
            raise ValueError(f"EvalTransform expects an RGB PIL image, got mode {image.mode!r}")
        oh, ow = self.output_hw(image.height, image.width)
        if (oh, ow) != (image.height, image.width):
            image = TF.resize(image, [oh, ow], interpolation=TF.InterpolationMode.BILINEAR)
        x = TF.pil_to_tensor(image).to(torch.float32).div_(255.0)  # == F.to_tensor for uint8 RGB
        return x.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        p = self.preprocessing
        return f"EvalTransform(short_side={p.short_side}, max_size={p.max_size}, mean={p.mean}, std={p.std})"
