"""The one-of-each helpers: ``DetectorOutput.map``, the atomic write, the COCO box helper, the metric names,
the sweep reader."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mfdetr.contracts import DetectorOutput


def _output() -> DetectorOutput:
    g = torch.Generator().manual_seed(0)
    return DetectorOutput(
        queries=torch.randn(2, 3, 8, generator=g),
        boxes=torch.rand(2, 3, 4, generator=g),
        logits=torch.randn(2, 3, 5, generator=g),
        enc_maps={
            2: [torch.randn(2, 8, 6, 7, generator=g), torch.randn(2, 8, 3, 4, generator=g)],
            4: [torch.randn(2, 8, 6, 7, generator=g), torch.randn(2, 8, 3, 4, generator=g)],
        },
        c1=torch.randn(2, 4, 12, 14, generator=g),
        input_hw=torch.tensor([[48, 56], [40, 52]]),
        orig_hw=torch.tensor([[96, 112], [80, 104]]),
        level_valid_hw=torch.tensor([[[6, 7], [3, 4]], [[5, 7], [3, 4]]]),
        extras={"image_id": [7, 9], "damaged": []},
    )


def _tensors(det: DetectorOutput) -> dict[str, torch.Tensor]:
    """Every tensor of ``det`` by a name that tells its place (enc maps by layer and level)."""
    out = {f.name: getattr(det, f.name) for f in dataclasses.fields(det) if f.name not in ("enc_maps", "extras")}
    out.update({f"enc_maps[{k}][{i}]": m for k, v in det.enc_maps.items() for i, m in enumerate(v)})
    return out


SIZE_FIELDS = {"input_hw", "orig_hw", "level_valid_hw"}


def test_map_reaches_every_feature_and_size_field() -> None:
    det = _output()
    seen: list[int] = []

    def neg(t: torch.Tensor) -> torch.Tensor:
        seen.append(id(t))
        return -t

    out = det.map(neg, sizes=lambda t: t + 1)
    before, after = _tensors(det), _tensors(out)
    assert set(after) == set(before) and len(before) == 11  # 7 tensor fields + 2 layers × 2 levels
    for name, t in before.items():
        want = t + 1 if name in SIZE_FIELDS else -t
        assert torch.equal(after[name], want), name
    assert sorted(seen) == sorted(id(t) for n, t in before.items() if n not in SIZE_FIELDS)
    assert sorted(out.enc_maps) == [2, 4] and all(len(v) == 2 for v in out.enc_maps.values())
    # extras ride along in a new dict (a later edit of one output's extras never shows in the other)
    assert out.extras == det.extras and out.extras is not det.extras
    out.extras["image_id"] = [1, 2]
    assert det.extras["image_id"] == [7, 9]


def test_map_without_sizes_keeps_the_size_tensors() -> None:
    det = _output()
    out = det.map(lambda t: t.half())
    assert out.queries.dtype == out.enc_maps[4][1].dtype == out.c1.dtype == torch.float16
    assert all(getattr(out, n) is getattr(det, n) for n in SIZE_FIELDS)


def test_to_and_select_keep_their_results() -> None:
    det = _output()
    half = det.to("cpu", torch.float16)
    assert half.queries.dtype == torch.float16 and half.enc_maps[2][0].dtype == torch.float16
    assert half.input_hw.dtype == torch.int64 and torch.equal(half.orig_hw, det.orig_hw)
    sub = det.select(torch.tensor([1]))
    for name, t in _tensors(sub).items():
        assert torch.equal(t, _tensors(det)[name][1:2]), name
    assert sub.extras == det.extras


def test_online_rebuilds_use_map() -> None:
    from mfdetr.engine.online import round_features, zero_padding

    det = _output()
    r = round_features(det, torch.float16)
    assert torch.equal(r.queries, det.queries.half().float()) and torch.equal(r.c1, det.c1.half().float())
    assert torch.equal(r.boxes, det.boxes) and torch.equal(r.logits, det.logits)  # not rounded
    z = zero_padding(det)
    assert z.enc_maps[4][0].shape[-2:] == (6, 7) and bool((z.enc_maps[4][0][1, :, 5:] == 0).all())
    assert z.c1.shape[-2:] == (12, 14) and bool((z.c1[1, :, 10:] == 0).all()) and bool((z.c1[1, :, :, 13:] == 0).all())
    assert z.queries is det.queries and z.extras == det.extras and z.extras is not det.extras


def test_first_queries_and_detached() -> None:
    from mfdetr.engine.finetune import _detached
    from mfdetr.masknet.targets import first_queries

    det = _output()
    two = first_queries(det, 2)
    assert two.num_queries == 2 and two.logits.shape == (2, 2, 5) and two.c1 is det.c1
    leaf = det.map(lambda t: t.clone().requires_grad_(True))
    free = _detached(leaf.map(lambda t: t * 2))
    assert not any(t.requires_grad for t in _tensors(free).values())
    with pytest.raises(ValueError, match="cannot take 4 of 3"):
        first_queries(det, 4)


def test_atomic_path_renames_only_a_complete_file(tmp_path) -> None:
    import os

    from mfdetr.errors import MfdetrError
    from mfdetr.outputs import atomic_path, atomic_write_text

    target = tmp_path / "out.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(ValueError, match="half"):  # any failure: the old file stays, no temporary is left
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("half done")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(MfdetrError, match=r"out.json: cannot write the summary \(Permission denied\)"):
        with atomic_path(target, what="summary") as tmp:
            tmp.write_text("x")
            raise PermissionError(13, "Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with atomic_path(target, shared=True) as tmp:  # writers of one file in several processes: own temporaries
        assert tmp.parent == tmp_path and tmp.name == f".out.json.{os.getpid()}.tmp"
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_preset_file_and_plot_write_through_the_helper(tmp_path) -> None:
    import json

    from mfdetr.detectors import get_preset
    from mfdetr.detectors.preset_file import save_preset_file
    from mfdetr.engine.reports.plot import plot_run

    out = save_preset_file(get_preset("demo"), tmp_path / "p.json", name="mine")
    assert json.loads(out.read_text())["name"] == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    )
    png = plot_run(run, run / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_coco_bbox_clips_to_the_image_then_gives_xywh() -> None:
    from mfdetr.ops.boxes import clip_boxes, coco_bbox

    xyxy = torch.tensor([[-5.0, 2.0, 30.0, 50.0], [10.0, -1.0, 12.0, 3.0], [45.0, 38.0, 60.0, 41.0]])
    hw = (40, 48)  # h, w
    assert torch.equal(
        clip_boxes(xyxy, hw), torch.tensor([[0.0, 2.0, 30.0, 40.0], [10.0, 0.0, 12.0, 3.0], [45.0, 38.0, 48.0, 40.0]])
    )
    assert torch.equal(
        coco_bbox(xyxy, hw), torch.tensor([[0.0, 2.0, 30.0, 38.0], [10.0, 0.0, 2.0, 3.0], [45.0, 38.0, 3.0, 2.0]])
    )
    assert coco_bbox(xyxy[None].double(), (40.0, 48.0)).shape == (1, 3, 4)  # any leading dims, float sizes


def test_cached_box_results_are_clipped_coco_boxes() -> None:
    from mfdetr.engine.evaluate import box_results

    det = _output()
    det.boxes = torch.tensor([[[0.5, 0.5, 1.4, 0.2], [0.1, 0.9, 0.4, 0.4], [0.5, 0.5, 0.2, 0.2]]] * 2)
    det.logits = torch.full((2, 3, 5), -9.0)
    det.logits[:, :, 1] = 3.0
    res = box_results(det, [0, 11, 12, 13, 14], [7, 9])
    assert [r["image_id"] for r in res] == [7] * 3 + [9] * 3 and {r["category_id"] for r in res} == {11}
    h0, w0 = 96.0, 112.0
    assert res[0]["bbox"] == pytest.approx([0.0, 0.4 * h0, w0, 0.2 * h0])  # clipped left and right
    assert res[1]["bbox"] == pytest.approx([0.0, 0.7 * h0, 0.3 * w0, 0.3 * h0])  # clipped left and at the bottom
    assert all(isinstance(v, float) for r in res for v in r["bbox"])


def _sweep_file(tmp_path, *sets: str):
    f = tmp_path / "s.toml"
    rows = "".join(
        f'[[variants]]\nname="v{i}"\nlabels=["{i}"]\nset={list(s)!r}\n'.replace("'", '"') for i, s in enumerate(sets)
    )
    f.write_text(
        '[sweep]\ntable="T"\ntitle="t"\ncolumns=["a"]\n[base.masknet]\nroi_size=8\n[base.train]\niterations=3\n' + rows
    )
    return f


def test_sweep_reader_applies_every_section_of_a_variant(tmp_path) -> None:
    from mfdetr.engine.sweep import load_sweep, run_overrides, variant_masknet_config

    f = _sweep_file(tmp_path, ["masknet.box_encoder.layers=3", "train.iterations=7", "loss.dice_weight=2.5"], [])
    spec = load_sweep(f)
    changed, base = spec.variants
    assert variant_masknet_config(spec, changed).box_encoder.layers == 3
    assert variant_masknet_config(spec, changed).roi_size == 8 == variant_masknet_config(spec, base).roi_size
    cfg = spec.config_for(changed)
    assert cfg.train.iterations == 7 and cfg.loss == {"dice_weight": 2.5}
    assert spec.config_for(base).train.iterations == 3
    # the caller's overrides on top; keys outside the run config's sections are mask network keys
    assert run_overrides(["box_encoder.layers=1", "train.lr=0.1", "masknet.roi_size=16"]) == [
        "masknet.box_encoder.layers=1",
        "train.lr=0.1",
        "masknet.roi_size=16",
    ]
    mcfg = variant_masknet_config(spec, changed, run_overrides(["box_encoder.layers=1", "roi_size=16"]))
    assert mcfg.box_encoder.layers == 1 and mcfg.roi_size == 16


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("train.nope=1", r"\[v0\].*unknown key.*nope"),
        ("loss.nope=1", r"s.toml: variant v0: loss: unknown key.*nope"),
        ("assign.nope=1", r"s.toml: variant v0: assign: unknown key.*nope"),
        ("masknet.box_encoder.depth=2", r"s.toml: variant v0: masknet.box_encoder: unknown key.*depth"),
        ("online.lsj=3", r"online.lsj.*true/false"),
    ],
)
def test_sweep_reader_refuses_a_bad_override_of_any_section(tmp_path, bad: str, needle: str) -> None:
    from mfdetr.engine.sweep import load_sweep
    from mfdetr.errors import MfdetrError

    with pytest.raises(MfdetrError, match=needle):
        load_sweep(_sweep_file(tmp_path, [bad]))


def test_describe_reads_sweeps_with_the_sweep_reader(tmp_path) -> None:
    from typer.testing import CliRunner

    from mfdetr.cli import app

    def describe(sweep, *extra: str):
        return CliRunner().invoke(
            app,
            [
                "describe",
                "-c",
                str(sweep),
                "--d",
                "32",
                "--levels",
                "8/16",
                "--c1-channels",
                "24",
                "--no-flops",
                *extra,
            ],
        )

    f = _sweep_file(
        tmp_path, ["masknet.image_encoder.layers=1", "train.iterations=7"], ["masknet.image_encoder.layers=2"]
    )
    r = describe(f, "neck.groups=8")
    assert r.exit_code == 0, r.output
    n1, n2 = (int(m.split()[1].replace(",", "")) for m in r.output.splitlines() if m.startswith(("v0 ", "v1 ")))
    assert n2 > n1 > 0
    bad = _sweep_file(tmp_path, ["train.bogus=1"])
    r = describe(bad)
    assert r.exit_code == 2 and "mfdetr: error:" in r.output and "bogus" in r.output and "Traceback" not in r.output


def test_detector_configs_use_the_typed_config_reader(tmp_path) -> None:
    import json

    from mfdetr.detectors import get_preset
    from mfdetr.detectors.backbones.factory import BackboneConfig
    from mfdetr.detectors.dino.config import DinoConfig
    from mfdetr.detectors.preset_file import load_preset_file
    from mfdetr.errors import MfdetrError

    arch = json.loads(json.dumps(dict(get_preset("dino_tiny").arch)))
    cfg = DinoConfig.from_dict(arch)
    assert json.dumps(cfg.to_dict(), sort_keys=True) == json.dumps(arch, sort_keys=True)  # no value changes type
    assert DinoConfig.from_dict({**arch, "backbone": cfg.backbone}) == cfg
    with pytest.raises(MfdetrError, match=r"DinoConfig.hidden_dim: expected an integer, got '32'"):
        DinoConfig.from_dict({**arch, "hidden_dim": "32"})
    with pytest.raises(MfdetrError, match=r"DinoConfig.backbone: unknown key\(s\) depth"):
        DinoConfig.from_dict({**arch, "backbone": {**arch["backbone"], "depth": 3}})
    with pytest.raises(MfdetrError, match=r"backbone config.out_indices\[0\]: expected an integer"):
        BackboneConfig.from_dict({"kind": "tiny", "out_indices": [True]})
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"name": "x", "family": "dino", "arch": {**arch, "num_queries": 1.5}}))
    with pytest.raises(MfdetrError, match=r"p.json: bad arch: DinoConfig.num_queries: expected an integer, got 1.5"):
        load_preset_file(f)
    f.write_text(json.dumps({"name": "x", "family": "dino", "arch": {**arch, "hiden_dim": 3}}))
    with pytest.raises(MfdetrError, match=r"p.json: bad arch: unknown DinoConfig keys: \['hiden_dim'\]"):
        load_preset_file(f)


def test_cache_source_hint_is_written_whole_by_each_shard(tmp_path) -> None:
    import json

    from mfdetr.cache.manifest import SOURCE_HINT
    from mfdetr.cache.run import write_source_hint

    store = tmp_path / "store"
    store.mkdir()
    write_source_hint(store, coco=tmp_path / "coco", annotation_file=tmp_path / "coco" / "a.json")
    hint = json.loads((store / SOURCE_HINT).read_text())
    assert hint == {
        "coco_root": str((tmp_path / "coco").resolve()),
        "annotation_path": str((tmp_path / "coco" / "a.json").resolve()),
    }
    assert sorted(p.name for p in store.iterdir()) == [SOURCE_HINT]  # no temporary file left
