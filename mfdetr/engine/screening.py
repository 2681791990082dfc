"""Which images of a COCO split the online mode can run: readable files, sizes the detector takes.

Used where an image cannot simply be skipped at load time (the online evaluation set, the training
split before the epoch plan is fixed): the images left out are reported on stderr, one line each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mfdetr.contracts import ImageBatch


def readable_indices(coco: Any, indices: Sequence[int]) -> list[int]:
    """``indices`` whose image file passes :func:`mfdetr.data.images.header_problem` (others reported)."""
    import sys

    from mfdetr.data.images import header_problem

    kept = []
    for i in indices:
        info = coco.image_info(coco.image_ids[i])
        why = header_problem(coco.image_path(coco.image_ids[i]), expect_hw=(int(info["height"]), int(info["width"])))
        if why is None:
            kept.append(int(i))
        else:
            print(
                f"mfdetr: left out image id {coco.image_ids[i]} ({coco.file_name(coco.image_ids[i])}): {why}",
                file=sys.stderr,
            )
    return kept


def runnable_indices(
    coco: Any,
    detect: Callable[[ImageBatch, torch.device], Any],
    device: torch.device,
    indices: Sequence[int],
    coarsest_stride: int,
) -> list[int]:
    """``indices`` of a COCO split whose network input the detector can process.

    Only sizes where the coarsest feature map would be one cell on a side (shorter input side ≤
    ``coarsest_stride``: extreme aspect ratios, tiny detectors' inputs) are in question: each such size
    is probed once with a blank image (batch of one, ``detect(batch, device)``); the images of a size
    that fails are reported on stderr and left out. Other images are kept without a probe.
    """
    import sys

    from mfdetr.data import run_or_skip

    verdict: dict[tuple[int, int], str | None] = {}
    kept: list[int] = []
    for i in indices:
        info = coco.image_info(coco.image_ids[i])
        hw = coco.transform.output_hw(int(info["height"]), int(info["width"]))
        if min(hw) > coarsest_stride:
            kept.append(int(i))
            continue
        if hw not in verdict:
            h, w = hw
            probe = ImageBatch(
                images=torch.zeros(1, 3, h, w),
                pad_mask=torch.zeros(1, h, w, dtype=torch.bool),
                input_hw=torch.tensor([[h, w]]),
                orig_hw=torch.tensor([[h, w]]),
                image_ids=[0],
                file_names=["probe"],
            )
            _, failed = run_or_skip(lambda b: detect(b.to(device), device), probe)
            verdict[hw] = failed[0][1] if failed else None
        if verdict[hw] is None:
            kept.append(int(i))
        else:
            print(
                f"mfdetr: left out image id {coco.image_ids[i]} ({coco.file_name(coco.image_ids[i])}): {verdict[hw]}",
                file=sys.stderr,
            )
    return kept


__all__ = ["readable_indices", "runnable_indices"]
