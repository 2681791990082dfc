"""Sweep files (paper Tables 1-5, 10, 12, 14-16), recipes, the sweep runner and its tables, and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from mfdetr.config import from_dict, load_toml
from mfdetr.engine import load_run_config
from mfdetr.engine.reports.plot import nice_ticks, plot_run
from mfdetr.engine.sweep import METRICS, Variant, VariantResult, load_sweep, run_sweep
from mfdetr.errors import MfdetrError

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((REPO / "pipeline" / "ablations").glob("*.toml"))
RECIPES = sorted((REPO / "pipeline" / "recipes").glob("*.toml"))
TABLES = {
    "Table 1",
    "Table 2",
    "Table 3",
    "Table 4",
    "Table 5",
    "Table 10",
    "Table 11",
    "Table 12",
    "Table 13",
    "Table 14",
    "Table 15",
    "Table 16",
}  # 11 and 13 are online sweeps (fine-tuning, jitter)


def test_every_paper_table_has_a_sweep_file() -> None:
    specs = [load_sweep(p) for p in ABLATIONS]
    assert {s.sweep.table for s in specs} == TABLES
    rows = {s.sweep.table: len(s.variants) for s in specs}
    assert rows["Table 2"] == 10 and rows["Table 3"] == 10 and rows["Table 16"] == 5 and rows["Table 1"] == 4
    assert rows["Table 11"] == 3 and rows["Table 13"] == 2
    t1 = next(s for s in specs if s.sweep.table == "Table 1")
    assert not t1.sweep.train  # training-free baseline rows are evaluated only
    t12 = next(s for s in specs if s.sweep.table == "Table 12")
    last = t12.config_for(t12.variants[-1])
    assert last.masknet["mask_scoring"]["enabled"] and last.loss["point_sampling"] and last.masknet["neck"]["enabled"]
    assert t12.variants[-1].paper["params_m"] == 3.26


def test_recipes_per_detector() -> None:
    names = {p.stem for p in RECIPES}
    assert names == {"hdetr_r50", "hdetr_swinl", "dino_r50", "dino_swinl", "dino_focal", "demo"}
    for p in RECIPES:
        cfg = load_run_config(p)
        assert cfg.train.lr == 1.5e-4 and cfg.train.weight_decay == 5e-5
    assert (
        load_run_config(REPO / "pipeline/recipes/dino_focal.toml").masknet["image_encoder"]["layers"] == 3
    )  # Table 16
    assert load_run_config(REPO / "pipeline/recipes/hdetr_r50.toml").masknet["image_encoder"]["layers"] == 2


def test_sweep_and_recipe_tables_are_valid_masknet_configs() -> None:
    from mfdetr.masknet import MaskNetConfig, build_masknet
    from mfdetr.masknet.losses import LossConfig

    for p in ABLATIONS:
        spec = load_sweep(p)
        for v in spec.variants:
            cfg = spec.config_for(v)
            from_dict(MaskNetConfig, cfg.masknet, where=f"{p.name}:{v.name}")
            from_dict(LossConfig, cfg.loss, where=f"{p.name}:{v.name}")
    from mfdetr.detectors import get_preset, list_detectors

    for p in RECIPES:
        cfg = load_run_config(p)
        mcfg = from_dict(MaskNetConfig, cfg.masknet, where=p.name)
        from_dict(LossConfig, cfg.loss, where=p.name)
        name = p.stem  # every recipe is named after the preset it is sized for
        if name in list_detectors():  # the recipe builds a MaskNet for its detector's feature shapes
            pre = get_preset(name)
            net = build_masknet(
                mcfg, d_model=pre.hidden_dim, level_strides=pre.level_strides, c1_channels=pre.c1_channels
            )
            assert sum(q.numel() for q in net.parameters()) > 0


def _fake_variant(v: Variant, cfg, vdir: Path) -> VariantResult:  # noqa: ANN001
    # a stand-in for "train + evaluate": numbers derived from the variant's config
    layers = cfg.masknet["image_encoder"]["layers"]
    (vdir / "ran").write_text("1")
    return VariantResult(
        name=v.name,
        labels=[],
        params_m=0.75 * layers,
        flops_g=14.2 * layers,
        metrics={**{m: 10.0 * layers + i for i, m in enumerate(METRICS)}, "boundary_AP": 10.0 * layers - 5.0},
    )


def test_run_sweep_writes_tables_and_resumes(tmp_path: Path) -> None:
    spec = load_sweep(REPO / "pipeline/ablations/table02_image_encoder.toml")
    out = tmp_path / "sweep"
    res = run_sweep(
        spec,
        out_dir=out,
        run_variant=_fake_variant,
        only=["none", "deformable-2"],
        overrides=["train.iterations=3"],
        log=lambda s: None,
    )
    assert [r.name for r in res] == ["none", "deformable-2"]
    md = (out / "summary.md").read_text()
    assert (
        "| block type | # layers | #FLOPs▲ | #params▲ | AP | AP50 | AP75 | APs | APm | APl | AP^boundary | paper AP |"
    ) in md
    assert "| 24.0 | 25.0 | 15.0 | 32.9 |" in md  # APm, APl, boundary AP, then the paper's AP
    assert "| deformable | 2 | 28.40 G | 1.50 M | 20.0 | 21.0 |" in md and "| 32.9 | 1.51 M |" in md
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows[1]["name"] == "deformable-2" and float(rows[1]["AP"]) == 20.0 and float(rows[1]["paper_AP"]) == 32.9
    assert float(rows[1]["boundary_AP"]) == 15.0
    assert json.loads((out / "deformable-2" / "result.json").read_text())["params_m"] == 1.5
    (out / "none" / "ran").unlink()
    run_sweep(
        spec,
        out_dir=out,
        run_variant=_fake_variant,
        only=["none"],
        overrides=["train.iterations=3"],
        log=lambda s: None,
    )
    assert not (out / "none" / "ran").exists()  # finished variants are not rerun
    with pytest.raises(MfdetrError, match=r"variant none was run with other inputs.*config.train.iterations"):
        run_sweep(spec, out_dir=out, run_variant=_fake_variant, only=["none"], log=lambda s: None)
    with pytest.raises(MfdetrError, match="no variant named nope"):
        run_sweep(spec, out_dir=out, run_variant=_fake_variant, only=["nope"])


def test_bad_sweep_files(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[sweep]\ntable="T"\ntitle="t"\ncolumns=["a"]\n[[variants]]\nname="x"\nlabels=["1","2"]\n')
    with pytest.raises(MfdetrError, match="2 labels for 1 columns"):
        load_sweep(f)
    f.write_text(
        '[sweep]\ntable="T"\ntitle="t"\ncolumns=["a"]\n[[variants]]\nname="x"\nlabels=["1"]\nset=["train.nope=1"]\n'
    )
    with pytest.raises(MfdetrError, match=r"\[x\].*unknown key.*nope"):
        load_sweep(f)
    f.write_text('[sweep]\ntable="T"\ntitle="t"\ncolumns=["a"]\ncolour="red"\n[[variants]]\nname="x"\nlabels=["1"]\n')
    with pytest.raises(MfdetrError, match="colour"):
        load_sweep(f)


def test_nice_ticks() -> None:
    assert nice_ticks(0, 1) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    t = nice_ticks(3.7, 48.2)
    assert t[0] <= 3.7 and t[-1] >= 48.2 and len(t) <= 7


def test_plot_run_renders_two_panels(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss_mask": 1.0 / s, "lr": 1e-4} for s in range(1, 40)]
    recs += [{"kind": "eval", "step": s, "AP": s / 2, "AP50": s} for s in (10, 20, 39)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = plot_run(run)
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 480)
    left, right = img.crop((0, 0, 600, 480)), img.crop((600, 0, 1200, 480))
    blue, orange = (31, 119, 180), (255, 127, 14)
    for panel in (left, right):  # each panel draws its first two series
        colours = {c for _, c in panel.getcolors(maxcolors=1 << 16)}
        assert blue in colours and orange in colours
    with pytest.raises(MfdetrError, match="metrics.jsonl"):
        plot_run(tmp_path)
    assert load_toml  # the recipe loader is the config module's
