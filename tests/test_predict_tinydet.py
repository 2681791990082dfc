"""The ``dino_tiny64`` test preset (``tests/_tiny_detector.py``) detects at 64 px."""

from __future__ import annotations

import torch

from mfdetr.detectors.registry import get_preset
from tests._tiny_detector import NAME, build_tiny


def test_tiny64_preset_detects_at_64px() -> None:
    from mfdetr.contracts import ImageBatch

    det = build_tiny()
    x = torch.randn(1, 3, 64, 80)
    batch = ImageBatch(
        images=x,
        pad_mask=torch.zeros(1, 64, 80, dtype=torch.bool),
        input_hw=torch.tensor([[64, 80]]),
        orig_hw=torch.tensor([[48, 60]]),
        image_ids=[1],
        file_names=["x"],
    )
    with torch.inference_mode():
        out = det.detect(batch, topk=10, enc_layers=(4,)).validate()
    assert out.c1.shape[-2:] == (16, 20)
    assert get_preset(NAME).preprocessing.short_side == 64
