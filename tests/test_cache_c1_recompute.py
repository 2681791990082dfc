"""``mfdetr cache --c1 recompute``: the store carries the frozen stage 0 instead of C1, and stage 2
recomputes C1 from the image — equal to the detector's own C1 in float32 and, after float16 rounding,
bit-equal to what ``--c1 store`` stores (same device type: the same fp32 values round the same way).

Detectors: ``dino_tiny64`` (the ``dino_tiny`` preset's code and size at 64-px preprocessing) and the
shipped ``demo`` detector (its real weights and 160-px preprocessing), on 40-px synthetic images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfdetr.cache import CacheJob, CacheStore, run_cache
from mfdetr.cache.stage0 import Stage0Program, load_stage0
from mfdetr.cache.store import stored_bytes
from mfdetr.engine.cache_data import CacheDataset, open_annotations
from mfdetr.engine.collate import collate_detector_outputs
from mfdetr.errors import MfdetrError
from tests.conftest import REPO, cli_env
from tests._tiny_detector import NAME as TINY, TINY_MASKNET, save_detector_checkpoint

DEMO_CKPT = REPO / "mfdetr" / "detectors" / "weights" / "demo_dino.pt"
ENC = {TINY: 4, "demo": 3}


def _cache(root: Path, det: str, ckpt: Path, split: str, mode: str) -> Path:
    out = root / f"{det}_{split}_{mode}"
    if not out.exists():
        run_cache(
            CacheJob(
                detector=det,
                checkpoint=ckpt,
                coco=root / "synth",
                split=split,
                out=out,
                topk=10,
                enc_layers=(ENC[det],),
                batch_size=1,
                num_workers=0,
                c1=mode,
            ),
            progress=False,
            echo=lambda *a, **k: None,
        )
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mfdetr.data import SynthConfig, generate_synth

    root = tmp_path_factory.mktemp("c1")
    # seed 40: no square 40-px image in either split (dino_tiny64's stride-64 level would be 1 x 1)
    generate_synth(root / "synth", config=SynthConfig(train=4, val=3, image_size=40, seed=40))
    save_detector_checkpoint(root / "tiny.pth")
    return root


def _ckpt(root: Path, det: str) -> Path:
    return root / "tiny.pth" if det == TINY else DEMO_CKPT


def _dataset(store: Path, enc: int) -> CacheDataset:
    s = CacheStore.open(store)
    return CacheDataset(store=s, coco_split=open_annotations(s, coco=None), enc_layer=enc)


@pytest.mark.parametrize("det", [TINY, "demo"])
def test_recomputed_c1_equals_detector_and_stored_c1(root: Path, det: str) -> None:
    from mfdetr.data import CocoInstances, collate
    from mfdetr.detectors import build_detector, get_preset

    stored, recomp = (_cache(root, det, _ckpt(root, det), "val2017", m) for m in ("store", "recompute"))
    r = CacheStore.open(recomp)
    assert r.c1_mode == "recompute" and "c1" not in r.manifest["arrays"] and not (recomp / "c1").exists()
    assert (recomp / "stage0" / "program.json").is_file() and (recomp / "stage0" / "weights.pt").is_file()
    assert "c1" not in CacheStore.open(stored).manifest  # --c1 store writes today's manifest
    assert stored_bytes(recomp) < stored_bytes(stored)
    detector = build_detector(det, checkpoint=_ckpt(root, det))
    coco = CocoInstances(root / "synth", "val2017", preprocessing=get_preset(det).preprocessing, with_targets=False)
    rs, ss = _dataset(recomp, ENC[det]), _dataset(stored, ENC[det])
    program = rs.prepare_batch.program("cpu")
    for i in range(len(rs)):
        item = coco[i]
        with torch.inference_mode():
            want = detector.detect(collate([item]), topk=10, enc_layers=(ENC[det],)).c1
        batch = collate_detector_outputs([rs[i]])
        image = batch.det.extras["c1_image"][0]
        assert torch.equal(image, item.image)  # the worker's preprocessing = the detector's input tensor
        with torch.inference_mode():
            got = program(image[None])
        assert torch.equal(got, want)  # float32: bit-equal
        # float16: the recompute batch equals the stored batch bit for bit (same fp32 values, same rounding)
        assert torch.equal(rs.prepare_batch(batch, "cpu").det.c1, collate_detector_outputs([ss[i]]).to("cpu").det.c1)
    # a batch of images of different sizes: C1 zero-padded exactly as the reader + collate pad stored C1
    two = rs.prepare_batch(collate_detector_outputs([rs[0], rs[2]]), "cpu").det.c1
    ref = collate_detector_outputs([ss[0], ss[2]]).to("cpu").det.c1
    assert two.shape == ref.shape and torch.equal(two, ref)


def test_training_and_eval_from_recompute_match_store(root: Path) -> None:
    from mfdetr.engine import build_run_config
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    ck = _ckpt(root, TINY)
    caches = {m: {s: _cache(root, TINY, ck, s, m) for s in ("train2017", "val2017")} for m in ("store", "recompute")}
    losses, metrics = {}, {}
    for mode, workers in (("store", 0), ("recompute", 1)):  # one worker: forkserver, store reopened there
        cfg = build_run_config(
            {
                "train": {
                    "device": "cpu",
                    "iterations": 2,
                    "batch_size": 2,
                    "log_every": 1,
                    "num_workers": workers,
                    "progress": False,
                }
            },
            [o for o in TINY_MASKNET],
            where="test",
        )
        out = root / f"run_{mode}"
        _, metrics[mode] = train_from_cache(
            cfg,
            CacheSources(cache=caches[mode]["train2017"], coco=None, val_cache=caches[mode]["val2017"]),
            out,
            log=lambda s: None,
        )
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses["store"]) == 2 and losses["recompute"] == pytest.approx(losses["store"], rel=1e-6, abs=1e-7)
    assert metrics["recompute"]["segm"] == pytest.approx(metrics["store"]["segm"], abs=1e-9, nan_ok=True)
    res = {m: json.loads((root / f"run_{m}" / "val_results.json").read_text()) for m in losses}
    assert len(res["store"]) > 0 and len(res["recompute"]) == len(res["store"])
    for a, b in zip(res["recompute"], res["store"], strict=True):  # the same masks, the same scores
        assert (a["image_id"], a["category_id"], a["segmentation"]) == (
            b["image_id"],
            b["category_id"],
            b["segmentation"],
        )
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)


def test_missing_or_changed_image_is_a_one_line_error(root: Path, tmp_path: Path) -> None:
    from PIL import Image

    src = _cache(root, TINY, _ckpt(root, TINY), "val2017", "recompute")
    shutil.copytree(root / "synth", tmp_path / "synth")
    store = tmp_path / "store"
    shutil.copytree(src, store)
    s = CacheStore.open(store)
    ds = CacheDataset(store=s, coco_split=open_annotations(s, coco=tmp_path / "synth"), enc_layer=4)
    path = ds.coco.image_path(ds.image_ids[0])
    im = Image.open(path).convert("RGB")
    im.putpixel((0, 0), (255 - im.getpixel((0, 0))[0], 0, 0))
    im.save(path, format=Image.open(path).format)
    with pytest.raises(MfdetrError, match="image file changed") as e:
        ds.prepare_batch(collate_detector_outputs([ds[0]]), "cpu")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.unlink()
    with pytest.raises(MfdetrError, match="cannot read the image") as e:
        ds.prepare_batch(collate_detector_outputs([ds[0]]), "cpu")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    # the stored stage 0 is checked against the manifest's sha256
    (store / "stage0" / "weights.pt").write_bytes(b"x")
    with pytest.raises(MfdetrError, match="sha256 differs"):
        load_stage0(store, s.manifest["c1"]["stage0"])


def test_a_hostile_stage0_is_refused_without_running_code(root: Path, tmp_path: Path) -> None:
    store = _cache(root, TINY, _ckpt(root, TINY), "val2017", "recompute")
    program = json.loads((store / "stage0" / "program.json").read_text())
    weights = (store / "stage0" / "weights.pt").read_bytes()
    Stage0Program.from_bytes(json.dumps(program).encode(), weights)  # the genuine files load
    for op in ("builtins.eval", "aten.from_file.default", "torch.load", "os.system"):
        bad = {**program, "nodes": [{**program["nodes"][0], "op": op}, *program["nodes"][1:]]}
        with pytest.raises(ValueError, match="not allowed"):
            Stage0Program.from_bytes(json.dumps(bad).encode(), weights)
    bad = {**program, "nodes": [{**program["nodes"][0], "args": [{"ref": "__import__"}]}, *program["nodes"][1:]]}
    with pytest.raises(ValueError, match="plain data"):
        Stage0Program.from_bytes(json.dumps(bad).encode(), weights)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - unpickling this would run a command
            return (Path.write_text, (marker, "1"))

    import io

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        Stage0Program.from_bytes(json.dumps(program).encode(), buf.getvalue())
    assert not marker.exists()


def test_stage2_recompute_never_imports_a_detector(root: Path) -> None:
    store = _cache(root, TINY, _ckpt(root, TINY), "val2017", "recompute")
    code = (
        "import sys, torch; from mfdetr.engine.cache_data import CacheDataset, open_annotations; "
        "from mfdetr.engine.collate import collate_detector_outputs; from mfdetr.cache import CacheStore; "
        f"s = CacheStore.open({str(store)!r}); ds = CacheDataset(store=s, coco_split=open_annotations(s, coco=None), "
        "enc_layer=4); b = ds.prepare_batch(collate_detector_outputs([ds[0], ds[1]]), 'cpu'); "
        "assert b.det.c1.shape[1] == s.manifest['c1_channels'] and b.det.c1.abs().sum() > 0; "
        "bad = [m for m in sys.modules if m.startswith('mfdetr.detectors')]; assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def test_c1_option_errors_and_dry_run(root: Path, tmp_path: Path) -> None:
    import tests._fake_detector as fd

    fd.register()
    coco = tmp_path / "coco"
    fd.make_coco(coco, n=2)
    ck = fd.save_fake_checkpoint(tmp_path / "fake.pth")
    job = CacheJob(
        detector=fd.NAME,
        checkpoint=ck,
        coco=coco,
        split="val2017",
        out=tmp_path / "s",
        topk=8,
        num_workers=0,
        c1="recompute",
    )
    with pytest.raises(MfdetrError, match="stage 0.*--c1 store"):  # a detector without a backbone stage 0
        run_cache(job, progress=False, echo=lambda *a, **k: None)
    assert not (tmp_path / "s").exists()
    with pytest.raises(MfdetrError, match="--c1 must be"):
        run_cache(CacheJob(**{**job.__dict__, "c1": "drop"}), progress=False, echo=lambda *a, **k: None)
    lines: list[str] = []
    est = {
        m: run_cache(CacheJob(**{**job.__dict__, "c1": m}), dry_run=True, echo=lines.append).estimate
        for m in ("store", "recompute")
    }
    assert est["recompute"]["bytes_per_image"] < est["store"]["bytes_per_image"]  # type: ignore[index]
    assert any("no C1 array" in ln for ln in lines)


def test_run_batches_follow_the_epoch_plan_and_workers_never_fork() -> None:
    from mfdetr.engine.loading import RunBatches, loader_options
    from mfdetr.engine.sampling import EpochPlan

    plan = EpochPlan(num_items=7, batch_size=2, seed=3)  # 4 steps per epoch
    want = [b for e in range(4) for b in plan.rank_batches(e)][5:13]
    assert list(RunBatches(plan, 5, 13)) == want and len(RunBatches(plan, 5, 13)) == 8
    assert loader_options(0) == {"num_workers": 0}
    opts = loader_options(3, 4)
    assert opts["multiprocessing_context"] in ("forkserver", "spawn") and opts["persistent_workers"]
    assert opts["num_workers"] == 3 and opts["prefetch_factor"] == 4


def _backbones() -> dict[str, object]:
    import mfdetr.detectors.dino.demo  # noqa: F401 - registers the demo's resnet_bn kind
    from mfdetr.detectors.backbones import BackboneConfig, build_backbone
    from tests._backbones import tiny_focalnet as focalnet
    from tests._backbones import tiny_swin as swin

    return {
        "tiny": lambda: build_backbone(BackboneConfig(kind="tiny")),
        "resnet_bn": lambda: build_backbone(BackboneConfig(kind="resnet_bn", params={"widths": (8, 16, 32, 64)})),
        "resnet": lambda: build_backbone(BackboneConfig(kind="resnet", params={"depths": (1, 1, 1, 1)})),
        "swin_5scale": swin,
        "focalnet": focalnet,
    }  # swin 5-scale: stage 0 is a level, so C1 is normed


@pytest.mark.parametrize("kind", ["tiny", "resnet_bn", "resnet", "swin_5scale", "focalnet"])
def test_every_backbone_stage0_exports_exactly(kind: str) -> None:
    from mfdetr.cache.stage0 import export_stage0

    torch.manual_seed(0)
    bb = _backbones()[kind]().eval()  # type: ignore[operator]
    with torch.no_grad():  # non-trivial BN statistics and norms
        for p in bb.parameters():
            p.add_(0.05 * torch.randn_like(p))
    program, weights = export_stage0(bb.stage0(), torch.randn(1, 3, 61, 83))
    stored = Stage0Program.from_bytes(program, weights)
    x = torch.randn(2, 3, 45, 38)  # another size, orientation and batch than the export's
    with torch.inference_mode():
        assert torch.equal(stored(x), bb(x)[0])
