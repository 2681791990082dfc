"""Hostile ground truth: degenerate polygons, garbage RLE, bad boxes and non-integer ids are dropped and
reported once (one warning line), an unusable annotation file is a one-line error, and eval-json scores
as pycocotools on the GT without the damaged instances."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tests._fake_detector as fd
from tests._hostile_data import damage_gt, no_traceback, pycocotools_stats
from tests.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2


def test_ground_truth_is_cleaned_and_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mfdetr.data import CocoInstances, load_annotations

    fd.make_coco(tmp_path, n=3)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0].pop("area")  # filled with the mask's area
    data["annotations"][1].pop("iscrowd")  # filled with 0
    ann.write_text(json.dumps(data))
    _, bad_ids = damage_gt(ann)
    capsys.readouterr()
    f = load_annotations(ann)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mfdetr: warning: {ann}: ignored {3 * 14} of {3 * 14 + 2}")
    assert "polygon with < 3 points" in err[0] and "undecodable compressed RLE" in err[0]
    assert {a["id"] for a in f.data["annotations"]} == {1, 3}
    assert not bad_ids & {a["id"] for a in f.data["annotations"]}
    kept = {a["id"]: a for a in f.data["annotations"]}
    assert kept[1]["area"] == pytest.approx(float((44 // 2 - 44 // 4) * (30 // 2 - 30 // 4)))
    assert kept[3]["iscrowd"] == 0
    ds = CocoInstances(tmp_path, "val2017")  # training targets: only the usable instances
    assert [len(ds.load_targets(i)) for i in ds.image_ids] == [1, 0, 1]


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id 1"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99 (annotation id 1)"),
    ],
)
def test_unusable_ground_truth_is_one_line(tmp_path: Path, mutate: Any, needle: str) -> None:
    fd.make_coco(tmp_path, n=3)
    ann = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    proc = cli("eval-json", "--coco", tmp_path, "--results", ann)
    assert proc.returncode == 2 and needle in proc.stderr and str(ann) in proc.stderr
    no_traceback(proc)


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("segm", "bbox"):
            rows[parts[0]] = [float(v) for v in parts[1:]]
    return rows


def test_eval_json_on_damaged_ground_truth_equals_pycocotools_on_the_clean_one(tmp_path: Path) -> None:
    from mfdetr.data import SynthConfig, generate_synth
    from mfdetr.evaluation import gt_to_results, load_coco_gt

    generate_synth(tmp_path, config=SynthConfig(train=1, val=6, image_size=64, seed=2))
    ann = tmp_path / "annotations" / "instances_val2017.json"
    rng = np.random.default_rng(0)
    results = gt_to_results(load_coco_gt(ann))
    for r in results:  # imperfect: jittered boxes, random scores, some dropped
        r["bbox"] = [v + float(rng.normal(0, 1.5)) for v in r["bbox"]]
        r["score"] = float(rng.uniform(0.1, 1.0))
    results = [r for r in results if rng.random() < 0.8]
    res_file = tmp_path / "res.json"
    res_file.write_text(json.dumps(results))
    clean, _ = damage_gt(ann)
    proc = cli("eval-json", "--coco", tmp_path, "--results", res_file, "--iou-type", "both")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert len([ln for ln in proc.stderr.splitlines() if "ignored" in ln]) == 1
    table = _table(proc.stdout)
    for t in ("segm", "bbox"):
        want = pycocotools_stats(clean, results, t)
        assert all(
            (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=0.006)
            for a, b in zip(table[t], want, strict=True)
        ), (t, table[t], want)
        assert 5.0 < table[t][0] < 100.0
