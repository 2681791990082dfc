"""Padded image batches and padded per-level maps for the detector tests."""

from __future__ import annotations

import torch

from mfdetr.contracts import ImageBatch


def make_batch(sizes: list[tuple[int, int]], *, seed: int = 0, pad_noise: bool = False) -> ImageBatch:
    """Zero-padded batch of random images of the given (h, w)."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, hp, wp)
    mask = torch.ones(len(sizes), hp, wp, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    if pad_noise:
        images = torch.where(mask[:, None], torch.randn(images.shape, generator=g) * 5, images)
    hw = torch.tensor(sizes, dtype=torch.long)
    return ImageBatch(
        images=images,
        pad_mask=mask,
        input_hw=hw,
        orig_hw=hw * 3,
        image_ids=list(range(len(sizes))),
        file_names=[f"{i}.jpg" for i in range(len(sizes))],
    )


def crop_valid(m: torch.Tensor, hw) -> torch.Tensor:
    """The valid top-left ``hw`` region of a (padded) map."""
    return m[..., : int(hw[0]), : int(hw[1])]


def padded_levels(valid: list[tuple[int, int]], canvas: list[tuple[int, int]], d: int, *, seed: int, noise: bool):
    """Per-level maps whose valid top-left region is the same random content for every canvas size;
    the padded part is zeros or noise."""
    g = torch.Generator().manual_seed(seed)
    srcs, masks = [], []
    for (h, w), (hp, wp) in zip(valid, canvas, strict=True):
        content = torch.randn(1, d, h, w, generator=g)
        src = torch.randn(1, d, hp, wp) * 3 if noise else torch.zeros(1, d, hp, wp)
        src[..., :h, :w] = content
        mask = torch.ones(1, hp, wp, dtype=torch.bool)
        mask[:, :h, :w] = False
        srcs.append(src)
        masks.append(mask)
    return srcs, masks
