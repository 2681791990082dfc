"""detrex DINO checkpoints: recognised by their key layout, loaded strictly through the rename table, the
architecture read by ``--detector auto`` (detrex's positional encoding, per-layer heads), identical outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mfdetr.detectors import build_detector
from mfdetr.detectors.auto import architecture_of
from mfdetr.detectors.dino import build_dino
from mfdetr.detectors.hdetr import HDetrConfig
from mfdetr.detectors.hdetr.presets import build_hdetr
from mfdetr.detectors.resolve import resolve_detector
from mfdetr.errors import MfdetrError
from tests._checkpoint_files import DETREX_CFG, detrex_file, to_detrex
from tests._det_batches import make_batch
from tests.conftest import cli_output


def test_detrex_checkpoint_round_trips_to_identical_outputs(tmp_path: Path) -> None:
    model, path = detrex_file(tmp_path / "model_final.pth")
    family, cfg = architecture_of(path)
    assert family == "dino" and cfg == DETREX_CFG
    cats = tmp_path / "instances.json"
    cats.write_text('{"categories": [' + ", ".join(f'{{"id": {i}, "name": "c{i}"}}' for i in range(1, 8)) + "]}")
    det = resolve_detector("auto", path, categories_file=cats)
    built = build_detector(det.name, checkpoint=path)
    ref = model.freeze()
    batch = make_batch([(64, 96), (80, 64)], pad_noise=True)
    a, b = ref.detect(batch, topk=10, enc_layers=(1, 2)), built.detect(batch, topk=10, enc_layers=(1, 2))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits) and torch.equal(a.c1, b.c1)
    assert all(torch.equal(x, y) for x, y in zip(a.enc_maps[2], b.enc_maps[2], strict=True))


def test_detrex_checkpoint_is_loaded_strictly(tmp_path: Path) -> None:
    _, path = detrex_file(tmp_path / "a.pth")
    obj = torch.load(path, weights_only=True)
    obj["model"]["transformer.decoder.layers.0.norms.3.weight"] = torch.ones(32)
    torch.save(obj, tmp_path / "extra.pth")
    with pytest.raises(MfdetrError, match=r"unexpected keys \(1\): transformer\.decoder\.layers\.0\.norms\.3\.weight"):
        build_dino(DETREX_CFG, checkpoint=tmp_path / "extra.pth")
    # a preset with the official DINO's positional encoding refuses detrex weights instead of running them wrong
    official = dataclasses.replace(DETREX_CFG, pe_temperature_h=20.0, pe_temperature_w=20.0, pe_offset=0.0)
    with pytest.raises(MfdetrError, match="use --detector auto"):
        build_dino(official, checkpoint=path)


def test_detrex_class_slots_map_to_the_datasets_sorted_category_ids(tmp_path: Path) -> None:
    """detrex numbers its slots in the order of the dataset's sorted ids (ids 11..17 here)."""
    import json

    _, path = detrex_file(tmp_path / "seven.pth")
    cats = tmp_path / "instances.json"
    cats.write_text(json.dumps({"categories": [{"id": i, "name": f"c{i}"} for i in (17, 12, 11, 13, 16, 15, 14)]}))
    det = resolve_detector("auto", path, categories_file=cats)
    assert det.preset.class_to_category == (11, 12, 13, 14, 15, 16, 17)
    with pytest.raises(MfdetrError, match="detrex checkpoint numbers its classes"):
        resolve_detector("auto", path)
    code, out = cli_output("synth", "--out", tmp_path / "synth", "--train", "1", "--val", "1")
    assert code == 0, out
    code, out = cli_output(
        "cache", "--detector", "auto", "--checkpoint", path, "--coco", tmp_path / "synth", "--out", tmp_path / "c"
    )
    assert code != 0 and "has 7 class slots" in out and "has 6 categories" in out and "instances_val2017.json" in out
    assert not (tmp_path / "c").exists()


#: a small H-Deformable-DETR as detrex builds it (300 one-to-one queries, top-300, inverse_sigmoid eps 1e-3)
HCFG = HDetrConfig(
    backbone=DETREX_CFG.backbone,
    hidden_dim=32,
    nheads=8,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=64,
    enc_n_points=2,
    dec_n_points=2,
    num_feature_levels=4,
    num_classes=7,
    num_queries_one2one=300,
    num_queries_one2many=20,
    num_select=300,
    inv_sigmoid_eps=1e-3,
)


def test_detrex_hdetr_checkpoint_round_trips_to_identical_outputs(tmp_path: Path) -> None:
    from mfdetr.detectors.common.arch import family_preset
    from mfdetr.detectors.hdetr.model import build_hdetr_model

    torch.manual_seed(0)
    model = build_hdetr_model(HCFG, preset=family_preset("t", "hdetr", HCFG, checkpoint_file=None, box_ap=None))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    sd = {to_detrex(k).replace("query_embed.", "query_embedding."): v for k, v in model.state_dict().items()}
    assert "query_embedding.weight" in sd and not any(k.startswith(("input_proj", "backbone.0.")) for k in sd)
    path = tmp_path / "hdetr_final.pth"
    torch.save({"model": sd}, path)
    family, cfg = architecture_of(path)
    assert family == "hdetr" and cfg == HCFG
    cats = tmp_path / "instances.json"
    cats.write_text('{"categories": [' + ", ".join(f'{{"id": {i}, "name": "c{i}"}}' for i in range(1, 8)) + "]}")
    det = resolve_detector("auto", path, categories_file=cats)
    built = build_detector(det.name, checkpoint=path)
    batch = make_batch([(160, 192), (144, 176)])
    a, b = model.freeze().detect(batch, topk=10, enc_layers=(2,)), built.detect(batch, topk=10, enc_layers=(2,))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits) and torch.equal(a.queries, b.queries)
    official = dataclasses.replace(HCFG, inv_sigmoid_eps=1e-5)
    with pytest.raises(MfdetrError, match="use --detector auto"):
        build_hdetr(official, checkpoint=path)
    no_refine = {k: v for k, v in sd.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    torch.save({"model": no_refine}, tmp_path / "norefine.pth")
    with pytest.raises(MfdetrError, match="without with_box_refine"):
        architecture_of(tmp_path / "norefine.pth")
