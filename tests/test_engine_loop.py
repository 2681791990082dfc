"""The training loop and its hooks: call order, checkpointed hook state, resume, the typed model protocol,
and the detector training's earlier checkpoint format."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mfdetr.engine.distributed import DistContext
from mfdetr.engine.training import (
    Checkpointer,
    Evaluation,
    HookBase,
    LRSchedule,
    MetricsLog,
    Trainer,
    TrainData,
    TrainModel,
    restore,
)
from mfdetr.engine.training.models import FineTunedModel, Supervised
from mfdetr.errors import Interrupted, MfdetrError
from tests._det_training_data import tiny_cfg

pytestmark = pytest.mark.usefixtures("tiny_preset")  # the tiny DINO preset, registered for this module

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


class Line:
    """A TrainModel: least squares of ``w · x`` against ``2 x``."""

    unused_parameters = False

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.network = nn.Linear(3, 1, bias=False)

    def to(self, device: torch.device) -> None:
        self.network.to(device)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.network.parameters()), "lr_scale": 1.0}]

    def losses(self, net: nn.Module, batch: Tensor, step: int) -> Mapping[str, Tensor]:
        return {"total": ((net(batch) - 2 * batch.sum(-1, keepdim=True)) ** 2).mean()}

    def image_ids(self, batch: Tensor) -> list[Any]:
        return list(range(len(batch)))


class Batches:
    """Step ``s``'s batch is a function of ``s``."""

    def __init__(self, poison_at: int | None = None) -> None:
        self.poison_at = poison_at

    def batches(self, start: int, stop: int) -> Iterator[Tensor]:
        for s in range(start, stop):
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(s))
            yield x * float("nan") if s == self.poison_at else x

    def to_device(self, batch: Tensor, device: torch.device) -> Tensor:
        return batch.to(device)


class Constant:
    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        for g in optimizer.param_groups:
            g["lr"] = 0.05 * g.get("lr_scale", 1.0)
        return 0.05

    def state_dict(self) -> dict[str, object]:
        return {"lr": 0.05}


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def before_train(self, t: Trainer) -> None:
        self.calls.append(("before_train", t.step))

    def before_step(self, t: Trainer) -> None:
        self.calls.append(("before_step", t.step))

    def after_step(self, t: Trainer) -> None:
        self.calls.append(("after_step", t.step))

    def after_train(self, t: Trainer) -> None:
        self.calls.append(("after_train", t.step))

    def state_dict(self) -> dict[str, Any]:
        return {"recorder_calls": len(self.calls)}


def _trainer(
    path: Path, *hooks: HookBase, stop: int = 4, data: TrainData | None = None, every: int = 2
) -> tuple[Trainer, Line]:
    model = Line()
    path.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(path / "ckpt.pt", every=every, extra=lambda step: {"epoch": step // 2})
    trainer = Trainer(
        model=model,
        data=data or Batches(),
        hooks=[LRSchedule(Constant()), *hooks, ck],
        optimizer=torch.optim.SGD(model.param_groups(), lr=0.05),
        ctx=CPU,
        start=0,
        stop=stop,
        interrupt=lambda t: Interrupted(step=t.step, checkpoint=ck.path),
    )
    return trainer, model


def test_the_models_and_data_of_every_job_are_the_typed_protocols() -> None:
    from mfdetr.engine.training.batches import LoaderData
    from mfdetr.engine.training.detector import DetectionBatches, DinoTraining

    for cls in (Supervised, FineTunedModel, DinoTraining, Line):
        assert all(callable(getattr(cls, m, None)) for m in ("to", "param_groups", "losses", "image_ids")), cls
    assert isinstance(Supervised(nn.Linear(1, 1), lambda o, d, t: {}), TrainModel)
    assert isinstance(Line(), TrainModel) and not isinstance(nn.Linear(1, 1), TrainModel)
    assert FineTunedModel.unused_parameters and not Supervised.unused_parameters
    assert all(
        callable(getattr(c, "batches", None)) and callable(getattr(c, "to_device", None))
        for c in (LoaderData, DetectionBatches)
    )


def test_hooks_run_in_order_and_their_state_is_checkpointed(tmp_path: Path) -> None:
    rec = Recorder()
    trainer, model = _trainer(tmp_path, rec, stop=2)
    trainer.train()
    assert rec.calls == [
        ("before_train", 0),
        ("before_step", 0),
        ("after_step", 1),
        ("before_step", 1),
        ("after_step", 2),
        ("after_train", 2),
    ]
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["epoch"] == 1 and ck["schedule"] == {"lr": 0.05} and ck["recorder_calls"] == 6
    assert set(ck) >= {"model", "optimizer", "scaler", "rng"} and torch.equal(
        ck["model"]["weight"], model.network.weight
    )
    assert trainer.last.losses.keys() == {"loss"} and trainer.lr == 0.05


def test_resumed_loop_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    full, ref = _trainer(tmp_path / "a")
    full.train()
    half, _ = _trainer(tmp_path / "b", stop=2)
    half.train()
    again, model = _trainer(tmp_path / "b")
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    model.network.load_state_dict(state["model"])
    restore(again, state, path=tmp_path / "b" / "ckpt.pt")
    assert again.step == 2
    again.train()
    assert torch.equal(model.network.weight, ref.network.weight)
    with pytest.raises(MfdetrError, match="damaged checkpoint"):
        restore(again, {"model": state["model"]}, path=tmp_path / "x.pt")


def test_non_finite_loss_stops_before_the_update_and_names_the_images(tmp_path: Path) -> None:
    trainer, model = _trainer(tmp_path, data=Batches(poison_at=2))
    with pytest.raises(MfdetrError, match=r"non-finite loss at step 3 on image ids \[0, 1, 2, 3\]"):
        trainer.train()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2 and trainer.step == 2
    assert bool(torch.isfinite(model.network.weight).all())


def test_metrics_log_keeps_its_window_and_evaluation_runs_when_asked(tmp_path: Path) -> None:
    from mfdetr.engine.metrics import MetricLogger, read_jsonl

    log = MetricsLog(
        lambda start: MetricLogger(tmp_path, tensorboard=False, name="log.jsonl"), every=3, epoch_of=lambda s: s // 2
    )
    seen: list[int] = []
    ev = Evaluation(
        lambda net, step: {"AP": float(step)}, when=lambda s: s == 2, at_end=True, report=lambda s, m: seen.append(s)
    )
    trainer, _ = _trainer(tmp_path, log, ev, stop=4, every=0)
    trainer.train()
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert [(r["kind"], r["step"], r["epoch"]) for r in rows] == [("train", 3, 1), ("train", 4, 1)]
    assert seen == [2, 4] and ev.metrics == {"AP": 4.0}
    assert log.state_dict() == {"log_window": {}}


def test_earlier_detector_checkpoint_format_still_resumes(tmp_path: Path, toy_coco: Path) -> None:
    from mfdetr.engine.training.detector import train_detector

    quiet = {"log": lambda s: None}
    train_detector(tiny_cfg(toy_coco), tmp_path / "a", max_steps=3, **quiet)
    train_detector(tiny_cfg(toy_coco), tmp_path / "b", max_steps=2, **quiet)
    path = tmp_path / "b" / "checkpoint.pt"
    new = torch.load(path, weights_only=True)
    opt = new["optimizer"]
    for g in opt["param_groups"]:
        del g["lr_scale"]  # the earlier format's groups carry only lr_mult
    torch.save(
        {"model": new["model"], "optimizer": opt, "step": new["step"], "config": json.dumps({"preset": "x"})}, path
    )
    lines: list[str] = []
    train_detector(tiny_cfg(toy_coco), tmp_path / "b", max_steps=3, log=lines.append)
    assert any("resumed from" in ln and "at step 2/" in ln for ln in lines), lines
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(path, weights_only=True)
    assert b["step"] == 3 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert {g["lr_scale"] for g in b["optimizer"]["param_groups"]} == {1.0, 0.1}
