"""The tiny DINO training set-up of the detector-training tests: the preset name (registered by the
``tiny_preset`` fixture in ``conftest.py``), a toy COCO folder, a short training config and a toy batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mfdetr.contracts import DetectorPreset, Preprocessing
from mfdetr.detectors.dino import DINO_PRESETS
from mfdetr.detectors.training import DetTrainConfig
from mfdetr.detectors.training.recipe import DataOptions, OptimOptions

TINY = "test_tiny_train"


def tiny_train_preset() -> DetectorPreset:
    """dino_tiny with a small input size, named :data:`TINY`."""
    return dataclasses.replace(
        DINO_PRESETS["dino_tiny"], name=TINY, preprocessing=Preprocessing(short_side=64, max_size=96)
    )


def write_toy_coco(root: Path) -> Path:
    """A tiny COCO-format folder: 10 train / 4 val images with 0-3 filled rectangles (ids 1..3)."""
    rng = np.random.default_rng(0)
    colours = {1: (230, 40, 40), 2: (40, 230, 40), 3: (40, 40, 230)}
    for split, n, off in (("train2017", 10, 0), ("val2017", 4, 100)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            h, w = (64, 80) if i % 3 else (80, 64)
            img = np.full((h, w, 3), 128, np.uint8)
            for k in range(i % 4):
                cat = 1 + (i + k) % 3
                bw, bh = int(rng.integers(12, 30)), int(rng.integers(12, 30))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y : y + bh, x : x + bw] = colours[cat]
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": off + i + 1,
                        "category_id": cat,
                        "iscrowd": 0,
                        "bbox": [x, y, bw, bh],
                        "area": bw * bh,
                        "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                    }
                )
            name = f"{off + i + 1:012d}.png"
            Image.fromarray(img).save(root / split / name)
            images.append({"id": off + i + 1, "file_name": name, "height": h, "width": w})
        (root / "annotations").mkdir(exist_ok=True)
        cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


def tiny_cfg(root: Path, **train: object) -> DetTrainConfig:
    opts = {
        "seed": 3,
        "batch_size": 2,
        "epochs": 2,
        "lr": 1e-3,
        "lr_drop_epoch": 1,
        "threads": 1,
        "log_every": 1,
        "checkpoint_every": 2,
        "eval_every_epochs": 1,
        **train,
    }
    return DetTrainConfig(preset=TINY, data=DataOptions(root=str(root), val_images=4), train=OptimOptions(**opts))  # type: ignore[arg-type]


def toy_batch(preset_name: str = TINY) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two seeded random 64x80 images (the second padded on the right of column 64) and their targets."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 80)
    pad = torch.zeros(2, 64, 80, dtype=torch.bool)
    pad[1, :, 64:] = True
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return images, pad, targets
