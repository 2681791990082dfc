"""Engine pieces in-process: config, lr schedule, data order, padding collate, run-folder checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfdetr.engine import (
    EpochPlan,
    StepDecay,
    build_run_config,
    cat_detector_outputs,
    collate_detector_outputs,
    load_run_config,
    read_jsonl,
    seed_everything,
    step_seed,
    train,
)
from mfdetr.errors import MfdetrError
from tests._toy_engine import ToyCriterion, ToyDataset, ToyMaskNet, toy_item


def test_train_config_defaults_are_the_papers() -> None:
    cfg = build_run_config({})
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.lr_drop_at, t.lr_drop_factor) == (
        1.5e-4,
        (0.9, 0.999),
        5e-5,
        (0.9, 0.95),
        0.1,
    )


def test_config_overrides_and_unknown_keys(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('[train]\nbatch_size = 2\namp = "fp16"\n[masknet]\nroi_size = 32\n')
    cfg = load_run_config(f, ["train.iterations=100", "masknet.roi_size=16"])
    assert (cfg.train.batch_size, cfg.train.amp, cfg.train.iterations, cfg.masknet["roi_size"]) == (2, "fp16", 100, 16)
    # fixed-length tuples round-trip through the recorded plain data (a resumed run rebuilds its config)
    assert load_run_config(None, ["train.betas=[0.8, 0.95]"]).train.betas == (0.8, 0.95)
    again = build_run_config(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.train.betas == (0.9, 0.999)
    with pytest.raises(MfdetrError, match="unknown key.*lrr"):
        build_run_config({}, ["train.lrr=1"])
    with pytest.raises(MfdetrError, match="unknown key.*trian"):
        build_run_config({"trian": {}})
    with pytest.raises(MfdetrError, match="amp"):
        build_run_config({}, ["train.amp=fp8"])
    with pytest.raises(MfdetrError, match="batch_size"):
        build_run_config({}, ["train.batch_size=0"])


def test_step_decay_divides_by_ten_at_090_and_095() -> None:
    s = StepDecay(base_lr=1.0, total_steps=100)
    assert [s.lr_at(i) for i in (0, 89, 90, 94, 95, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    s = StepDecay(base_lr=1.5e-4, total_steps=88500)  # Sec. 3.1
    assert s.milestones == [79650, 84075]


def test_epoch_plan_is_seeded_disjoint_and_resumable() -> None:
    plans = [EpochPlan(num_items=11, batch_size=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    assert plans[0].steps_per_epoch == 3
    for epoch in (0, 1):
        b0, b1 = plans[0].rank_batches(epoch), plans[1].rank_batches(epoch)
        for x, y in zip(b0, b1, strict=True):
            assert not set(x) & set(y)  # ranks never share an item within a step
        flat = [i for b in b0 + b1 for i in b]
        assert set(flat) == set(range(11)) and len(flat) == 12
        assert plans[0].rank_batches(epoch, 1) == b0[1:]  # resume inside an epoch
    assert plans[0].order(0) != plans[0].order(1)  # reshuffled per epoch
    assert plans[0].order(0) == EpochPlan(num_items=11, batch_size=2, world_size=2, seed=3).order(0)
    assert plans[0].locate(7) == (2, 1)
    single = EpochPlan(num_items=11, batch_size=4, seed=3)  # 1 process × 4 = the same global order
    assert single.order(0) == plans[0].order(0)
    assert step_seed(0, 5) == step_seed(0, 5) != step_seed(0, 6) != step_seed(1, 5)


def test_collate_pads_to_the_batch_max_and_keeps_valid_sizes() -> None:
    items = [toy_item(i) for i in (0, 1, 2)]
    batch = collate_detector_outputs(items)
    det, targets = batch
    det.validate()
    assert len(batch) == 3 and [t.image_id for t in targets] == [0, 1, 2]
    hs = [d.c1.shape[-2] for d, _ in items]
    assert det.c1.shape[-2] == max(hs) and det.enc_maps[4][0].shape[-2] == max(
        d.enc_maps[4][0].shape[-2] for d, _ in items
    )
    for b, (d, _) in enumerate(items):  # original values kept, padding zero
        h, w = d.c1.shape[-2:]
        assert torch.equal(det.c1[b, :, :h, :w], d.c1[0])
        assert det.c1[b, :, h:, :].abs().sum() == 0 and det.c1[b, :, :, w:].abs().sum() == 0
        for lvl in range(2):
            m = d.enc_maps[4][lvl]
            assert torch.equal(det.enc_maps[4][lvl][b, :, : m.shape[-2], : m.shape[-1]], m[0])
    assert torch.equal(det.level_valid_hw, torch.cat([d.level_valid_hw for d, _ in items]))
    assert det.extras["image_id"] == [0, 1, 2]
    # padding never changes what a padding-aware model computes
    model = ToyMaskNet(dropout=0.0)
    alone = model(items[1][0])["mask_logits"]
    assert torch.allclose(model(det)["mask_logits"][1:2], alone, atol=1e-6)
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.det.queries.dtype == torch.float64 and moved.det.input_hw.dtype == torch.int64
    with pytest.raises(ValueError, match="encoder layers"):
        bad = toy_item(0)[0]
        bad.enc_maps = {6: bad.enc_maps[4]}
        cat_detector_outputs([items[0][0], bad])


def _toy_train(out: Path, *overrides: str, resume: bool = False) -> None:
    cfg = build_run_config(
        {"train": {"device": "cpu", "progress": False, "log_every": 2, "num_workers": 0, "batch_size": 2}},
        list(overrides),
    )
    seed_everything(cfg.train.seed)
    train(
        cfg=cfg,
        model=ToyMaskNet(),
        criterion=ToyCriterion(),
        train_set=ToyDataset(5),
        run_dir=out,
        resume=resume,
        evaluate_fn=lambda m, step: {"AP": float(step)},
    )


def test_train_in_process_records_and_refusals(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _toy_train(run, "train.epochs=2")
    recs = read_jsonl(run / "metrics.jsonl")
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == [2, 4, 6]  # 3 steps/epoch × 2 epochs, a record every 2 steps
    assert [r for r in recs if r["kind"] == "eval"] == [{"kind": "eval", "step": 6, "AP": 6.0}]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["lr"] == 1.5e-4
    rj = json.loads((run / "run.json").read_text())
    assert rj["global_batch"] == 2 and rj["total_steps"] == 6 and "torch" in rj["versions"]
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    assert ck["step"] == 6 and ck["config"] == cfg
    with pytest.raises(MfdetrError, match="--resume"):
        _toy_train(run, "train.epochs=2")
    with pytest.raises(MfdetrError, match="train.lr"):
        _toy_train(run, "train.epochs=2", "train.lr=1e-3", resume=True)
    with pytest.raises(MfdetrError, match="nothing to resume"):
        _toy_train(tmp_path / "empty", resume=True)
    _toy_train(run, "train.epochs=2", "train.num_workers=1", resume=True)  # harmless change: allowed


def test_adamw_is_fused_where_the_parameters_allow_and_updates_alike() -> None:
    from mfdetr.engine.optim import fused_adamw_fits, make_adamw

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = make_adamw([{"params": ps}], lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.sin(p.detach() * 3)
            q.grad = torch.sin(q.detach() * 3)
        fused.step()
        plain.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not fused_adamw_fits([]) and not fused_adamw_fits([torch.zeros(2, dtype=torch.complex64)])
    assert not make_adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3).defaults["fused"]
