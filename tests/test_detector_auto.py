"""``--detector auto``: the architecture from a checkpoint's args and tensor shapes (or an official config
file read as data), one-line errors for contradictions and unimplemented settings, preset files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mfdetr.detectors import build_detector
from mfdetr.detectors.auto import architecture_of, describe_preset
from mfdetr.detectors.auto.config_files import read_config_file
from mfdetr.detectors.dino.presets import DINO_CONFIGS, build_dino_model
from mfdetr.detectors.hdetr.presets import HDETR_CONFIGS
from mfdetr.detectors.resolve import resolve_detector
from mfdetr.errors import MfdetrError
from tests._checkpoint_files import DINO_ARGS, DINO_TINY, HDETR_ARGS, HDETR_TINY, save_checkpoint, tiny_model
from tests._det_batches import make_batch
from tests.conftest import cli_output


@pytest.mark.parametrize("family,cfg,args", [("dino", DINO_TINY, DINO_ARGS), ("hdetr", HDETR_TINY, HDETR_ARGS)])
def test_auto_builds_the_checkpoints_architecture_with_identical_outputs(tmp_path: Path, family, cfg, args) -> None:
    model = tiny_model(family)
    ckpt = save_checkpoint(tmp_path / f"my_{family}.pth", model, args)
    got_family, got = architecture_of(ckpt)
    assert got_family == family and got == cfg
    det = resolve_detector("auto", ckpt)
    assert det.name == f"auto-my_{family}" and det.checkpoint == ckpt and det.enc_layer == 3  # 2/3 of 4 layers
    built = build_detector(det.name, checkpoint=ckpt)
    ref = model.freeze()
    batch = make_batch([(64, 80), (48, 64)])
    a, b = ref.detect(batch, topk=10, enc_layers=(3,)), built.detect(batch, topk=10, enc_layers=(3,))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits) and torch.equal(a.queries, b.queries)
    assert torch.equal(a.enc_maps[3][0], b.enc_maps[3][0])


@pytest.mark.parametrize(
    "name", sorted(n for n in DINO_CONFIGS if n != "dino_tiny") + sorted(n for n in HDETR_CONFIGS if n != "hdetr_tiny")
)
def test_full_size_presets_are_recovered_from_shapes(name: str) -> None:
    """Every released architecture from its tensor shapes alone (+ nheads and, for H-DETR, the
    one-to-one query count: the two things shapes cannot tell), on meta tensors."""
    from mfdetr.detectors.common.arch import family_preset

    if name in DINO_CONFIGS:
        cfg, family, args = DINO_CONFIGS[name][0], "dino", {"nheads": 8}
        build = build_dino_model
    else:
        from mfdetr.detectors.hdetr.model import build_hdetr_model as build

        cfg, family = HDETR_CONFIGS[name][0], "hdetr"
        args = {"nheads": 8, "num_queries_one2one": cfg.num_queries_one2one}
    with torch.device("meta"):
        model = build(cfg, preset=family_preset(name, family, cfg, checkpoint_file=None, box_ap=None))
    got_family, got = architecture_of({"model": model.state_dict(), "args": args})
    assert got_family == family
    assert got.to_dict() == {**cfg.to_dict(), "num_select": got.num_select} and got.num_select == cfg.num_select


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"two_stage_type": "no"}, "args.two_stage_type = 'no'"),
        ({"nms_iou_threshold": 0.8}, "NMS in post-processing"),
        ({"num_classes": 80}, "class_embed.0.bias"),
        ({"enc_layers": 6}, "transformer.encoder.layers"),
        ({"backbone": "convnext_xlarge_22k"}, "args.backbone = 'convnext_xlarge_22k'"),
        ({"backbone": "resnet50"}, "tiny backbone"),
        ({"return_interm_indices": [0, 1, 2, 3]}, "args.return_interm_indices"),
        ({"nheads": None}, "nheads"),
        ({"modelname": "dab_deformable_detr"}, "args.modelname"),
    ],
)
def test_contradictions_and_unimplemented_settings_are_one_line_errors(tmp_path: Path, change, needle) -> None:
    args = {k: v for k, v in {**DINO_ARGS, **change}.items() if v is not None}
    ckpt = save_checkpoint(tmp_path / "bad.pth", tiny_model("dino"), args)
    code, out = cli_output("detectors", "show", "auto", "--checkpoint", ckpt)
    assert code != 0 and needle in out and str(ckpt) in out and len(out.strip().splitlines()) == 1, out


def test_hdetr_needs_its_one2one_query_count(tmp_path: Path) -> None:
    ckpt = save_checkpoint(
        tmp_path / "h.pth",
        tiny_model("hdetr"),
        {k: v for k, v in HDETR_ARGS.items() if not k.startswith("num_queries")},
    )
    with pytest.raises(MfdetrError, match="num_queries_one2one"):
        architecture_of(ckpt)
    with pytest.raises(MfdetrError, match="args.mixed_selection = False"):
        architecture_of(
            save_checkpoint(tmp_path / "m.pth", tiny_model("hdetr"), {**HDETR_ARGS, "mixed_selection": False})
        )


def test_config_files_are_read_as_data_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "base.py").write_text("nheads = 8\nnum_select = 300\nnum_queries = 20\n")
    (tmp_path / "DINO_tiny.py").write_text(
        f"_base_ = ['base.py']\nmodelname = 'dino'\nnheads = 4\nnum_select = 50\nreturn_interm_indices = [1, 2, 3]\n"
        f"two_stage_type = 'standard'\nside_effect = __import__('pathlib').Path({str(marker)!r}).touch()\n"
    )
    cfg = read_config_file(tmp_path / "DINO_tiny.py")
    assert cfg["nheads"] == 4 and cfg["num_queries"] == 20 and "side_effect" not in cfg and not marker.exists()
    ckpt = save_checkpoint(tmp_path / "noargs.pth", tiny_model("dino"), None)
    with pytest.raises(MfdetrError, match="nheads"):
        architecture_of(ckpt)  # shapes alone cannot tell the heads
    assert architecture_of(ckpt, config_file=tmp_path / "DINO_tiny.py") == ("dino", DINO_TINY)
    (tmp_path / "run.sh").write_text(
        "#!/usr/bin/env bash\nset -x\nEXP_DIR=exps/x\nPY_ARGS=${@:1}\npython -u main.py \\\n  --output_dir ${EXP_DIR} \\\n"
        "  --with_box_refine \\\n  --two_stage \\\n  --nheads 4 \\\n  --num_queries_one2one 20 \\\n"
        "  --num_queries_one2many 12 \\\n  --topk 50 \\\n  --mixed_selection \\\n  --look_forward_twice \\\n  ${PY_ARGS}\n"
    )
    hck = save_checkpoint(tmp_path / "h.pth", tiny_model("hdetr"), None)
    assert architecture_of(hck, config_file=tmp_path / "run.sh") == ("hdetr", HDETR_TINY)
    (tmp_path / "run2.sh").write_text(
        "python main.py --two_stage --with_box_refine --nheads 4 "
        "--num_queries_one2one 20 --topk 50 --look_forward_twice\n"
    )
    with pytest.raises(MfdetrError, match="mixed_selection"):
        architecture_of(hck, config_file=tmp_path / "run2.sh")
    bad = save_checkpoint(tmp_path / "bad.pth", tiny_model("dino"), {**DINO_ARGS, "nheads": 8})
    code, out = cli_output(
        "detectors", "show", "auto", "--checkpoint", bad, "--detector-config", tmp_path / "DINO_tiny.py"
    )
    assert code != 0 and "nheads = 4 but the checkpoint's args say 8" in out


def test_detectors_show_and_save_a_preset_file(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "mine.pth", tiny_model("dino"), DINO_ARGS)
    code, out = cli_output("detectors", "show", "auto", "--checkpoint", ckpt)
    assert code == 0 and out.startswith("detector auto-mine: dino, backbone tiny") and "20 queries" in out
    code, out = cli_output("detectors", "save", tmp_path / "mine.json", "--checkpoint", ckpt, "--name", "my_dino")
    assert code == 0, out
    rec = json.loads((tmp_path / "mine.json").read_text())
    assert rec["name"] == "my_dino" and rec["family"] == "dino" and rec["arch"]["num_queries"] == 20
    det = resolve_detector(str(tmp_path / "mine.json"), ckpt)
    assert det.name == "my_dino" and det.preset.arch == resolve_detector("auto", ckpt).preset.arch
    assert "d=32" in describe_preset(det.preset)
    built = build_detector("my_dino", checkpoint=ckpt)
    assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in tiny_model("dino").parameters())
    (tmp_path / "dino_r50.json").write_text(json.dumps({**rec, "name": "dino_r50"}))
    with pytest.raises(MfdetrError, match="already exists"):
        resolve_detector(str(tmp_path / "dino_r50.json"))


def test_cache_with_auto_records_and_prints_the_architecture(tmp_path: Path) -> None:
    code, out = cli_output("synth", "--out", tmp_path / "synth", "--train", "1", "--val", "2")
    assert code == 0, out
    ckpt = save_checkpoint(tmp_path / "custom.pth", tiny_model("dino"), DINO_ARGS)
    code, out = cli_output(
        "cache",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--coco",
        tmp_path / "synth",
        "--out",
        tmp_path / "c",
        "--workers",
        "0",
        "--no-progress",
        "--topk",
        "10",
    )
    assert code == 0, out
    assert out.startswith("detector auto-custom: dino, backbone tiny") and "default encoder layer 3" in out
    manifest = json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]["mfdetr_cache"]
    assert manifest["detector"]["name"] == "auto-custom" and manifest["enc_layers"] == [3]
    assert manifest["detector"]["arch"] == json.loads(json.dumps(DINO_TINY.to_dict()))
    code, out = cli_output(
        "cache",
        "--detector",
        "dino_tiny",
        "--detector-config",
        tmp_path / "x.py",
        "--coco",
        tmp_path / "synth",
        "--out",
        tmp_path / "c2",
    )
    assert code != 0 and "use it with --detector auto" in out


#: a one-step online run of a small MaskNet
SMALL_ONLINE_RUN = [
    "train.iterations=1",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.progress=false",
    "train.num_workers=0",
    "masknet.num_queries=10",
    "masknet.roi_size=16",
    "masknet.image_encoder.layers=1",
    "masknet.box_encoder.layers=1",
    "masknet.box_encoder.dim=32",
    "masknet.box_encoder.heads=4",
    "masknet.mask_scoring.channels=32",
    "masknet.mask_scoring.fc_dim=64",
]


def test_auto_online_train_eval_and_predict(tmp_path: Path) -> None:
    """train --online / eval --online / predict with --detector auto; eval --online rebuilds the recorded
    auto detector from the recorded checkpoint in a fresh registry."""
    from mfdetr.detectors.registry import unregister_detector

    code, out = cli_output("synth", "--out", tmp_path / "synth", "--train", "2", "--val", "2", "--image-size", "64")
    assert code == 0, out
    # the checkpoint's args set a 64-px eval resize (the tiny model at 800 px only costs time here)
    ckpt = save_checkpoint(
        tmp_path / "online.pth", tiny_model("dino"), {**DINO_ARGS, "data_aug_scales": [64], "data_aug_max_size": 96}
    )
    code, out = cli_output(
        "train",
        "--online",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--coco",
        tmp_path / "synth",
        "--topk",
        "10",
        "--out",
        tmp_path / "run",
        *SMALL_ONLINE_RUN,
    )
    assert code == 0, out
    assert "detector auto-online: dino" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["masknet"]["enc_layer"] == 3
    unregister_detector("auto-online")  # as in a new process
    code, out = cli_output(
        "eval",
        "--online",
        "--coco",
        tmp_path / "synth",
        "--checkpoint",
        tmp_path / "run" / "ckpt.pt",
        "--max-images",
        "1",
        "--per-category",
    )
    assert code == 0, out
    table = out[out.index("    id category") :].splitlines()  # the synthetic set's 6 categories
    assert [r.split()[:2] for r in table[1:]] == [
        ["1", "disc"],
        ["2", "box"],
        ["3", "triangle"],
        ["4", "arc"],
        ["5", "cross"],
        ["6", "star"],
    ]
    images = tmp_path / "synth" / "val2017"
    code, out = cli_output(
        "predict",
        "--detector",
        "auto",
        "--checkpoint",
        ckpt,
        "--masknet",
        tmp_path / "run" / "ckpt.pt",
        images,
        "--out",
        tmp_path / "preds",
        "--no-overlays",
        "--no-progress",
        "--score-threshold",
        "0",
    )
    assert code == 0, out
    pred = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert pred["meta"]["detector"] == "auto-online"
