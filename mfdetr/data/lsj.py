"""Large-scale jitter (LSJ, Ghiasi et al. 2021; paper Table 13) for the online training mode.

Per image and epoch: draw ``s ~ U(min_scale, max_scale)``, resize the image by
``f = s · min(T / H, T / W)`` (``T`` = ``size``; the image's long side becomes ``s · T``), then cut a
random window of at most ``T × T`` out of the result (detectron2's ``ResizeScale`` +
``FixedSizeCrop``, without padding the window to ``T × T``: batches are padded with a mask anyway).
The window **is** the network input: no further resize, ``input_hw = orig_hw`` = the window's size,
and the GT instances are re-expressed in that frame — masks by nearest-neighbour sampling of the
original masks (exact for ``f = 1`` and integer ``f``), boxes recomputed from the masks, instances with
nothing left in the window dropped (a crowd region stays a crowd region).

The draw is a pure function of ``(seed, epoch, index)`` (:meth:`set_epoch`, called by the training
loop before every epoch), so training with LSJ resumes exactly and DataLoader workers agree with the
main process.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from mfdetr.contracts import GTInstances
from mfdetr.data.coco import CocoInstances, CocoItem
from mfdetr.data.images import load_rgb
from mfdetr.data.masks import masks_to_boxes_xyxy
from mfdetr.errors import SkipImage


def lsj_window(h: int, w: int, *, size: int, scale: float, u: tuple[float, float]) -> tuple[int, int, int, int, float]:
    """Resized size and crop window of an ``h × w`` image: ``(nh, nw, y0, x0, f)``.

    ``u`` are two uniform draws in [0, 1) placing the window (top-left ``y0, x0``); the window is
    ``min(nh, size) × min(nw, size)``.
    """
    f = scale * min(size / h, size / w)
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    y0 = int(math.floor(u[0] * (max(nh - size, 0) + 1)))
    x0 = int(math.floor(u[1] * (max(nw - size, 0) + 1)))
    return nh, nw, y0, x0, f


def _source_index(start: int, n: int, f: float, limit: int) -> torch.Tensor:
    """Nearest source pixel of output pixels ``start .. start + n - 1`` of a ×``f`` resize."""
    idx = torch.floor((torch.arange(start, start + n, dtype=torch.float64) + 0.5) / f).to(torch.long)
    return idx.clamp_(0, limit - 1)


def jitter_instances(target: GTInstances, *, f: float, y0: int, x0: int, ch: int, cw: int) -> GTInstances:
    """GT instances of the resized-and-cropped window (see the module doc)."""
    h, w = target.orig_hw
    rows = _source_index(y0, ch, f, h)
    cols = _source_index(x0, cw, f, w)
    masks = target.masks[:, rows][:, :, cols] if len(target) else target.masks.new_zeros((0, ch, cw))
    keep = masks.flatten(1).any(1) if len(target) else torch.zeros(0, dtype=torch.bool)
    masks = masks[keep]
    return GTInstances(
        boxes=masks_to_boxes_xyxy(masks),
        labels=target.labels[keep],
        masks=masks,
        iscrowd=target.iscrowd[keep],
        image_id=target.image_id,
        orig_hw=(ch, cw),
    )


class LargeScaleJitter(Dataset[CocoItem]):
    """A COCO split with LSJ applied to every item (training only: needs GT targets).

    Args:
        base: the split (``with_targets=True``); its preprocessing gives the mean/std.
        size: the window side ``T`` (detectron2's LSJ: 1024 for COCO).
        min_scale, max_scale: the range of ``s`` (LSJ: 0.1 .. 2.0).
        seed: with the epoch and the index, fixes every draw.
    """

    def __init__(
        self, base: CocoInstances, *, size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0, seed: int = 0
    ) -> None:
        if not base.with_targets:
            raise ValueError("large-scale jitter needs a dataset with GT targets")
        if size < 8 or not 0 < min_scale <= max_scale:
            raise ValueError(f"need size >= 8 and 0 < min_scale <= max_scale, got {size}, {min_scale}, {max_scale}")
        self.base = base
        self.size, self.min_scale, self.max_scale = int(size), float(min_scale), float(max_scale)
        self.seed = int(seed)
        self.epoch = 0
        p = base.transform.preprocessing
        self._mean = torch.tensor(p.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(p.std, dtype=torch.float32).view(3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Draws of epoch ``epoch`` from now on (the training loop calls this before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def draw(self, index: int) -> tuple[float, tuple[float, float]]:
        """``(s, (u_y, u_x))`` of item ``index`` in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        s = float(rng.uniform(self.min_scale, self.max_scale))
        return s, (float(rng.random()), float(rng.random()))

    def __getitem__(self, index: int) -> CocoItem:
        image_id = self.base.image_ids[index]
        path = self.base.image_path(image_id)
        image = load_rgb(path)
        info = self.base.image_info(image_id)
        if (image.height, image.width) != (info["height"], info["width"]):
            raise SkipImage(
                path,
                f"image is {image.width}x{image.height} but the annotation file says {info['width']}x{info['height']}",
            )
        s, u = self.draw(index)
        nh, nw, y0, x0, f = lsj_window(image.height, image.width, size=self.size, scale=s, u=u)
        ch, cw = min(nh, self.size), min(nw, self.size)
        if (nh, nw) != (image.height, image.width):
            image = TF.resize(image, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR)
        x = TF.pil_to_tensor(image)[:, y0 : y0 + ch, x0 : x0 + cw].to(torch.float32).div_(255.0)
        x = x.sub_(self._mean).div_(self._std)
        target = jitter_instances(self.base.load_targets(image_id), f=f, y0=y0, x0=x0, ch=ch, cw=cw)
        return CocoItem(
            image=x,
            image_id=image_id,
            file_name=self.base.file_name(image_id),
            orig_hw=(ch, cw),
            input_hw=(ch, cw),
            target=target,
        )


__all__ = ["LargeScaleJitter", "jitter_instances", "lsj_window"]
