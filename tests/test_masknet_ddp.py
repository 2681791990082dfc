"""MaskNet on the positives only under ``torchrun --nproc-per-node 2`` (gloo, CPU): the mask-loss
normaliser is the positives count averaged over ranks, so the losses (averaged over ranks) and the
gradients (after DDP's averaging) equal one process on the same global batch — also when one rank has
no positive at all (every parameter still gets a zero gradient, so DDP does not wait for it).

Run as a script (``torchrun ... tests/test_masknet_ddp.py OUT``) it is the per-rank worker. Point
sampling is off: it draws per process, so two ranks cannot draw what one process draws.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfdetr.contracts import DetectorOutput, GTInstances  # noqa: E402
from mfdetr.masknet.criterion import MaskCriterion  # noqa: E402
from mfdetr.masknet.losses import LossConfig  # noqa: E402
from mfdetr.masknet.positives import PositivesOnly  # noqa: E402
from mfdetr.masknet.targets import AssignConfig  # noqa: E402
from tests._masknet_models import det64, gts_for, model64

# per step, the GT queries of each of the 4 images: rank 0 gets images 0-1, rank 1 images 2-3
STEPS = [
    [[0, 2, 3], [1], [], []],  # rank 1 has no positive
    [[0, 1, 2, 3, 4, 5], [4], [2], [0, 3]],
]  # uneven counts: a per-rank normaliser would differ
LOSS_KEYS = ("loss", "loss_mask_bce", "loss_mask_dice", "loss_mask_iou")


def rows(det: DetectorOutput, lo: int, hi: int) -> DetectorOutput:
    s = slice(lo, hi)
    return DetectorOutput(
        queries=det.queries[s],
        boxes=det.boxes[s],
        logits=det.logits[s],
        enc_maps={k: [m[s] for m in v] for k, v in det.enc_maps.items()},
        c1=det.c1[s],
        input_hw=det.input_hw[s],
        orig_hw=det.orig_hw[s],
        level_valid_hw=det.level_valid_hw[s],
    )


def setup(step: int) -> tuple[torch.nn.Module, MaskCriterion, DetectorOutput, list[GTInstances]]:
    det = det64(b=4)
    crit = MaskCriterion(
        loss_cfg=LossConfig(point_sampling=False), assign_cfg=AssignConfig(), class_to_category=tuple(range(7))
    )
    return model64(), crit, det, gts_for(det, STEPS[step])


def one_step(
    model: torch.nn.Module, crit: MaskCriterion, det: DetectorOutput, gts: list[GTInstances], step: int
) -> dict[str, object]:
    net = model
    if torch.distributed.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None, find_unused_parameters=False)
    model.zero_grad(set_to_none=True)
    losses = crit(net(det, gts, step=step), det, gts)
    losses["loss"].backward()
    return {
        "losses": {k: float(losses[k].detach()) for k in (*LOSS_KEYS, "num_pos")},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    r = torch.distributed.get_rank()
    res = {}
    for step in range(len(STEPS)):
        for key, global_norm in ((step, True), (f"local{step}", False)):
            masknet, crit, det, gts = setup(step)
            crit.global_normaliser = global_norm  # False: what a per-rank normaliser gives (differs at step 1)
            part = (rows(det, 2 * r, 2 * r + 2), gts[2 * r : 2 * r + 2])
            res[key] = one_step(PositivesOnly(masknet, crit), crit, *part, step)
    torch.save(res, out / f"rank{r}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    from tests.conftest import cli_env

    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for step in range(len(STEPS)):
        masknet, crit, det, gts = setup(step)
        ref = one_step(PositivesOnly(masknet, crit), crit, det, gts, step)
        counts = [rk[step]["losses"]["num_pos"] for rk in ranks]
        assert sum(counts) == ref["losses"]["num_pos"] > 0
        assert counts[1] == 0 if step == 0 else counts[0] != counts[1]
        for k in LOSS_KEYS:  # the trainer logs the mean over ranks
            mean = sum(rk[step]["losses"][k] for rk in ranks) / 2
            assert abs(mean - ref["losses"][k]) <= 1e-10, (step, k, mean, ref["losses"][k])
        for n, g in ref["grads"].items():
            for rk in ranks:  # DDP averaged the gradients: identical on both ranks, equal to one process
                assert float((rk[step]["grads"][n] - g).abs().max()) <= 1e-10, (step, n)
        if step == 1:
            local = ranks[0]["local1"]["grads"]
            assert max(float((local[n] - g).abs().max()) for n, g in ref["grads"].items()) > 1e-6


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
