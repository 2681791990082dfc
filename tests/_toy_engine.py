"""A toy stage-2 task for the engine tests (and a script the tests launch as a real process).

The toy dataset yields, per image, a small random :class:`DetectorOutput` (batch 1, per-image feature
sizes) plus :class:`GTInstances`; the toy model reads queries and the first encoder level and predicts
S×S mask logits; the toy criterion samples random points (global RNG) like the paper's point-sampled
loss, so exactness is tested with randomness in the loss and dropout in the model.

Run as a script: ``python tests/_toy_engine.py --out RUN [--resume] [--iterations N] ...``
(also under ``torchrun``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfdetr.contracts import DetectorOutput, GTInstances  # noqa: E402

K, D, C, C1, S = 4, 8, 3, 4, 8


def toy_item(index: int) -> tuple[DetectorOutput, GTInstances]:
    """Deterministic per index: image ``index`` of the toy dataset (sizes vary per image)."""
    g = torch.Generator().manual_seed(1000 + index)
    h, w = 16 + 4 * (index % 3), 16 + 4 * (index % 2)
    levels = [(h // 8, w // 8), (h // 16, w // 16)]
    det = DetectorOutput(
        queries=torch.randn(1, K, D, generator=g),
        boxes=torch.rand(1, K, 4, generator=g) * 0.5 + 0.25,
        logits=torch.randn(1, K, C, generator=g),
        enc_maps={4: [torch.randn(1, D, lh, lw, generator=g) for lh, lw in levels]},
        c1=torch.randn(1, C1, h // 4, w // 4, generator=g),
        input_hw=torch.tensor([[h, w]]),
        orig_hw=torch.tensor([[2 * h, 2 * w]]),
        level_valid_hw=torch.tensor([levels]),
        extras={"image_id": [index]},
    )
    masks = torch.rand(2, 2 * h, 2 * w, generator=g) > 0.5
    gt = GTInstances(
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 8.0, 8.0]]),
        labels=torch.tensor([1, 2]),
        masks=masks,
        iscrowd=torch.zeros(2, dtype=torch.bool),
        image_id=index,
        orig_hw=(2 * h, 2 * w),
    )
    return det, gt


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, *, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[DetectorOutput, GTInstances]:
        if self.delay:
            time.sleep(self.delay)
        return toy_item(i)


class ToyMaskNet(nn.Module):
    """queries ⊕ pooled level-0 features → S×S mask logits and an IoU guess."""

    def __init__(self, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * D, S * S)
        self.iou = nn.Linear(D, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, det: DetectorOutput) -> dict[str, Tensor]:
        lvl0 = det.enc_maps[min(det.enc_maps)][0]
        # mean over the valid region only: padding must not change the result
        vh, vw = det.level_valid_hw[:, 0, 0], det.level_valid_hw[:, 0, 1]
        mask = torch.zeros(lvl0.shape[0], 1, *lvl0.shape[-2:], device=lvl0.device)
        for b in range(lvl0.shape[0]):
            mask[b, :, : int(vh[b]), : int(vw[b])] = 1
        pooled = (lvl0 * mask).sum((-2, -1)) / mask.sum((-2, -1))
        x = torch.cat([det.queries, pooled[:, None].expand(-1, det.num_queries, -1)], -1)
        return {
            "mask_logits": self.proj(self.drop(x)).view(-1, det.num_queries, S, S),
            "iou_pred": self.iou(det.queries).squeeze(-1),
        }


class ToyCriterion:
    """BCE on randomly sampled points (global RNG, like point-sampled supervision) + L2 IoU loss."""

    def __init__(self, *, random_points: bool = True) -> None:
        self.random_points = random_points

    def __call__(self, out: dict[str, Tensor], det: DetectorOutput, targets: list[GTInstances]) -> dict[str, Tensor]:
        logits = out["mask_logits"].flatten(2)  # [B,K,S*S]
        target = (det.boxes[..., :1] > 0.5).float().expand_as(logits)
        if self.random_points:
            idx = torch.randint(0, S * S, (S * S // 2,), device=logits.device)
            logits, target = logits[..., idx], target[..., idx]
        mask = F.binary_cross_entropy_with_logits(logits, target)
        iou = F.mse_loss(out["iou_pred"], det.boxes[..., 2])
        return {"total": mask + iou, "loss_mask": mask, "loss_iou": iou}


def main(argv: list[str] | None = None) -> None:
    from mfdetr.engine import build_run_config, seed_everything, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--no-random", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    cfg = build_run_config(
        {"train": {"device": "cpu", "progress": False, "log_every": 1, "num_workers": 0}}, a.overrides
    )
    seed_everything(cfg.train.seed)
    model = ToyMaskNet(dropout=a.dropout)
    crit = ToyCriterion(random_points=not a.no_random)
    res = train(
        cfg=cfg,
        model=model,
        criterion=crit,
        train_set=ToyDataset(a.images),
        run_dir=a.out,
        resume=a.resume,
        manifest_sha256="toy",
    )
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(model.state_dict(), Path(a.out) / "final_model.pt")
        print(f"TOY_DONE steps={res.steps} global_batch={res.global_batch} lr={res.lr}")


if __name__ == "__main__":
    main()
