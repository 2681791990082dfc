"""Online-only training options (paper Tables 11 and 13): large-scale jitter of the
training images, fine-tuning the detector with MaskNet's losses, online evaluation, and the refusals
where these options cannot apply (a cache, a fine-tuned checkpoint evaluated on a cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mfdetr.errors import MfdetrError
from tests._tiny_detector import NAME, PLUGIN, TINY_MASKNET, save_detector_checkpoint


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mfdetr.data import SynthConfig, generate_synth

    root = tmp_path_factory.mktemp("online_aug")
    # seed 10: no square image. dino_tiny64 resizes a square 40-px image to 64 x 64, whose stride-64 level
    # is 1 x 1, and the official input GroupNorm (one channel per group there) refuses a single value
    generate_synth(root / "synth", config=SynthConfig(train=4, val=2, image_size=40, seed=10))
    return {"root": root, "coco": root / "synth", "det": save_detector_checkpoint(root / "det.pth")}


def _split(synth: dict[str, Path], split: str = "train2017") -> object:
    from mfdetr.data import CocoInstances
    from mfdetr.detectors import get_preset

    return CocoInstances(synth["coco"], split, preprocessing=get_preset(NAME).preprocessing)


def _nonempty_item(ds: object) -> tuple[int, object]:
    for i in range(len(ds)):  # type: ignore[arg-type]
        t = ds.load_targets(ds.image_ids[i])  # type: ignore[attr-defined]
        if len(t) >= 2:
            return i, t
    raise AssertionError("no synthetic image with 2 instances")


def test_lsj_at_scale_one_is_the_image_itself(synth: dict[str, Path]) -> None:
    from mfdetr.data import LargeScaleJitter, load_rgb

    base = _split(synth)
    i, target = _nonempty_item(base)
    h, w = target.orig_hw  # type: ignore[attr-defined]
    ds = LargeScaleJitter(base, size=max(h, w), min_scale=1.0, max_scale=1.0)  # type: ignore[arg-type]
    item = ds[i]
    assert item.input_hw == item.orig_hw == (h, w)
    img = load_rgb(base.image_path(base.image_ids[i]))  # type: ignore[attr-defined]
    import torchvision.transforms.functional as TF

    p = base.transform.preprocessing  # type: ignore[attr-defined]
    want = (TF.pil_to_tensor(img).float() / 255 - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(
        3, 1, 1
    )
    assert torch.allclose(item.image, want, atol=1e-6)
    assert torch.equal(item.target.masks, target.masks) and torch.equal(item.target.boxes, target.boxes)  # type: ignore[attr-defined]
    assert torch.equal(item.target.labels, target.labels)  # type: ignore[attr-defined]


def test_lsj_at_scale_two_samples_masks_exactly_and_is_seeded_per_epoch(synth: dict[str, Path]) -> None:
    from mfdetr.data import LargeScaleJitter, masks_to_boxes_xyxy
    from mfdetr.data.lsj import lsj_window

    base = _split(synth)
    i, target = _nonempty_item(base)
    h, w = target.orig_hw  # type: ignore[attr-defined]
    size = max(h, w)
    ds = LargeScaleJitter(base, size=size, min_scale=2.0, max_scale=2.0, seed=3)  # type: ignore[arg-type]
    item = ds[i]
    _, u = ds.draw(i)
    nh, nw, y0, x0, f = lsj_window(h, w, size=size, scale=2.0, u=u)
    assert f == 2.0 and (nh, nw) == (2 * h, 2 * w) and item.input_hw == (min(nh, size), min(nw, size))
    ch, cw = item.input_hw
    up = target.masks.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, y0 : y0 + ch, x0 : x0 + cw]  # type: ignore[attr-defined]
    keep = up.flatten(1).any(1)
    assert torch.equal(item.target.masks, up[keep]) and torch.equal(item.target.labels, target.labels[keep])  # type: ignore[attr-defined]
    assert torch.equal(item.target.boxes, masks_to_boxes_xyxy(up[keep]))
    # the draw is a function of (seed, epoch, index): the same again, another one next epoch
    assert ds.draw(i) == ds.draw(i)
    ds2 = LargeScaleJitter(base, size=64, seed=3)  # type: ignore[arg-type]
    d0 = ds2.draw(i)
    ds2.set_epoch(1)
    assert ds2.draw(i) != d0
    assert all(0.1 <= ds2.draw(j)[0] <= 2.0 for j in range(len(ds2)))
    it = ds2[i]
    assert max(it.input_hw) <= 64 and tuple(it.image.shape[1:]) == it.input_hw
    assert all(bool(m.any()) for m in it.target.masks)


def _online_cfg(tmp: Path, **online: object) -> object:
    from mfdetr.engine import build_run_config

    overrides = [
        *TINY_MASKNET,
        "train.device=cpu",
        "train.iterations=3",
        "train.batch_size=2",
        "train.log_every=1",
        "train.num_workers=0",
        "train.progress=false",
        "assign.iou_threshold=0.01",
    ]
    overrides += [f"online.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in online.items()]
    return build_run_config({}, overrides)


def test_finetune_trains_the_transformer_only_at_a_tenth_of_the_lr(synth: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.detectors import build_detector
    from mfdetr.engine import read_jsonl
    from mfdetr.engine.online import eval_online, train_online

    cfg = _online_cfg(tmp_path, lsj=True, lsj_size=48, finetune="transformer")
    out = tmp_path / "run"
    train_online(
        cfg,
        detector=NAME,
        checkpoint=str(synth["det"]),
        coco=str(synth["coco"]),
        out=str(out),
        topk=10,
        val_split="val2017",
    )
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    det_keys = [k for k in ckpt["model"] if k.startswith("detector.")]
    assert det_keys and all(k.startswith("detector.transformer.") for k in det_keys)
    assert any(k.startswith("masknet.") for k in ckpt["model"])
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
    base = build_detector(NAME, checkpoint=str(synth["det"])).state_dict()
    changed = [k for k in det_keys if not torch.equal(ckpt["model"][k], base[k[len("detector.") :]])]
    assert changed  # the detector's transformer moved ...
    assert ckpt["meta"]["online"]["finetune"] == "transformer"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]  # ... and it was evaluated
    # online evaluation of the run: its MaskNet and its fine-tuned detector tensors on the val split
    m = eval_online(out / "ckpt.pt", coco=synth["coco"], split="val2017", device="cpu")
    assert set(m) == {"segm", "boundary", "bbox"} and 0.0 <= m["segm"]["AP"] <= 100.0 or m["segm"]["AP"] == -1.0
    fast = eval_online(out / "ckpt.pt", coco=synth["coco"], split="val2017", device="cpu", evaluator="faster")
    assert all(fast[t] == pytest.approx(m[t], abs=0.01, nan_ok=True) for t in m)


def test_finetuned_state_round_trips_and_backbone_stays_frozen(synth: dict[str, Path]) -> None:
    from mfdetr.detectors import build_detector, get_preset
    from mfdetr.engine.finetune import FineTuned, split_state
    from mfdetr.masknet import build_masknet
    from tests._tiny_detector import tiny_masknet_config

    preset = get_preset(NAME)

    def make() -> FineTuned:
        mn = build_masknet(
            tiny_masknet_config(),
            d_model=preset.hidden_dim,
            level_strides=preset.level_strides,
            c1_channels=preset.c1_channels,
        )
        return FineTuned(mn, build_detector(NAME, checkpoint=str(synth["det"])), mode="transformer")

    a = make()
    a.train()
    assert not a.detector.training and a.masknet.training
    assert all(not p.requires_grad for n, p in a.detector.named_parameters() if not n.startswith("transformer."))
    with torch.no_grad():
        for _, p in a.detector.transformer.named_parameters():
            p.add_(0.5)
    b = make()
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    m, d = split_state(a.state_dict())
    assert set(m) == set(a.masknet.state_dict()) and d
    with pytest.raises(RuntimeError, match="fine-tuned detector tensors"):
        b.load_state_dict(dict(m))  # a plain MaskNet state lacks the detector tensors


def test_cached_runs_refuse_online_settings(tmp_path: Path) -> None:
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    with pytest.raises(MfdetrError, match="online.finetune.*--online"):
        train_from_cache(
            _online_cfg(tmp_path, finetune="all"),
            CacheSources(cache=tmp_path / "x", coco=None),  # type: ignore[arg-type]
            tmp_path / "run",
        )


def _finetuned_run_and_cache(synth: dict[str, Path], tmp_path: Path) -> None:
    """A fine-tuning online run in ``tmp_path / "ft"`` and a cache of the original detector in ``.../cache``."""
    from tests.conftest import cli

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[train]\niterations = 1\nbatch_size = 2\ndevice = 'cpu'\nnum_workers = 0\nprogress = false\n"
        "[online]\nfinetune = 'all'\n[assign]\niou_threshold = 0.01\n"
    )
    r = cli(
        "train",
        "--online",
        "--detector",
        NAME,
        "--checkpoint",
        str(synth["det"]),
        "--coco",
        str(synth["coco"]),
        "--config",
        str(cfg),
        "--out",
        str(tmp_path / "ft"),
        "--topk",
        "10",
        *TINY_MASKNET,
    )
    assert r.returncode == 0, r.stderr
    r = cli(
        "cache",
        "--detector",
        NAME,
        "--checkpoint",
        str(synth["det"]),
        "--coco",
        str(synth["coco"]),
        "--split",
        "val2017",
        "--out",
        str(tmp_path / "cache"),
        "--topk",
        "10",
        "--workers",
        "0",
    )
    assert r.returncode == 0, r.stderr


def test_finetuned_checkpoints_refuse_caches_and_load_online_and_in_predict(
    synth: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import assert_user_error, cli

    monkeypatch.setenv("MFDETR_PLUGINS", PLUGIN)
    _finetuned_run_and_cache(synth, tmp_path)
    # a fine-tuned run evaluated on a cache of the original detector: a one-line error
    r = cli(
        "eval",
        "--cache",
        str(tmp_path / "cache"),
        "--coco",
        str(synth["coco"]),
        "--checkpoint",
        str(tmp_path / "ft" / "ckpt.pt"),
    )
    assert_user_error(r, "fine-tuned the detector")
    r = cli(
        "eval",
        "--online",
        "--coco",
        str(synth["coco"]),
        "--checkpoint",
        str(tmp_path / "ft" / "ckpt.pt"),
    )
    assert r.returncode == 0 and "AP" in r.stdout, r.stderr
    # predict loads the fine-tuned detector tensors over the detector checkpoint
    r = cli(
        "predict",
        "--detector",
        NAME,
        "--checkpoint",
        str(synth["det"]),
        "--masknet",
        str(tmp_path / "ft" / "ckpt.pt"),
        str(synth["coco"] / "val2017"),
        "--out",
        str(tmp_path / "pred"),
    )
    assert r.returncode == 0 and "fine-tuned detector tensors" in r.stdout, r.stderr


def test_online_sweeps_of_tables_11_and_13(synth: dict[str, Path], tmp_path: Path) -> None:
    from mfdetr.engine.online import sweep_online
    from mfdetr.engine.sweep import load_sweep
    from tests.conftest import REPO

    tiny = [
        *TINY_MASKNET,
        "train.device=cpu",
        "train.iterations=1",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.progress=false",
        "assign.iou_threshold=0.01",
        "online.lsj_size=48",
    ]
    for table, names in (("table11_finetune", ["frozen", "partial-finetune", "finetune"]), ("table13_lsj", ["lsj"])):
        spec = load_sweep(REPO / "pipeline" / "ablations" / f"{table}.toml")
        res = sweep_online(
            spec,
            detector=NAME,
            checkpoint=str(synth["det"]),
            coco=str(synth["coco"]),
            out_dir=tmp_path / table,
            topk=10,
            overrides=tiny,
            only=names,
            log=lambda s: None,
        )
        assert [r.name for r in res] == names and all("AP" in r.metrics and r.params_m for r in res)
        assert (tmp_path / table / "summary.md").is_file()
    ft = torch.load(tmp_path / "table11_finetune" / "finetune" / "run" / "ckpt.pt", weights_only=False)
    assert any(k.startswith("detector.backbone") for k in ft["model"])  # `all` tunes the backbone too
    assert ft["meta"]["online"]["finetune"] == "all"


def test_sweep_cli_online_and_cached_need_their_sources(tmp_path: Path) -> None:
    from tests.conftest import REPO, assert_user_error, cli

    spec = REPO / "pipeline" / "ablations" / "table13_lsj.toml"
    assert_user_error(cli("sweep", spec, "--online", "--out", tmp_path / "s"), "--online needs --detector")
    assert_user_error(cli("sweep", spec, "--out", tmp_path / "s"), "--cache TRAIN --val-cache VAL")
    assert_user_error(
        cli("train", "--cache", tmp_path / "c", "--val-split", "val2017", "--out", tmp_path / "r"),
        "--val-split is for --online",
    )
    assert_user_error(cli("eval", "--online", "--checkpoint", tmp_path / "x.pt"), "--online evaluates")


@pytest.mark.slow
def test_torchrun_fine_tuning_with_gloo(synth: dict[str, Path], tmp_path: Path) -> None:
    """Fine-tuning leaves some detector parameters without gradient (class heads, the box head: RoIAlign
    passes none to boxes); DDP must be told, or it stops at the second step."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    env = {**cli_env(), "OMP_NUM_THREADS": "1", "MFDETR_PLUGINS": PLUGIN}
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[train]\niterations = 2\nbatch_size = 1\ndevice = 'cpu'\nnum_workers = 0\nprogress = false\n"
        "[online]\nfinetune = 'all'\n[assign]\niou_threshold = 0.01\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mfdetr",
            "train",
            "--online",
            "--detector",
            NAME,
            "--checkpoint",
            str(synth["det"]),
            "--coco",
            str(synth["coco"]),
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "ddp"),
            "--topk",
            "10",
            *TINY_MASKNET,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "global batch 2 (1 x 2)" in proc.stderr
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and any(k.startswith("detector.") for k in ckpt["model"])
