"""Any dataset's categories: class slot → category id matching, ``--categories`` files, per-category AP,
category names in predictions, the synthetic set's category-id option, DINO's evaluation resize."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mfdetr.data.synth import SynthConfig, generate_synth, synth_classes
from mfdetr.data.synth_render import SYNTH_CLASSES
from mfdetr.detectors.auto import eval_preprocessing
from mfdetr.detectors.categories import read_categories, slot_map
from mfdetr.engine.inference.names import category_names
from mfdetr.errors import MfdetrError
from mfdetr.evaluation import (
    CocoEvaluator,
    evaluate,
    format_category_table,
    gt_to_results,
    load_coco_gt,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs NumPy 2

SEVEN = [(i, f"c{i}") for i in range(11, 18)]


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_slots_match_by_id_then_by_count_and_order() -> None:
    m = slot_map(18, contiguous=False, origin="ck", dataset=SEVEN)  # slot = id; other slots predict nothing
    assert m == (0,) * 11 + tuple(range(11, 18))
    assert slot_map(7, contiguous=False, origin="ck", dataset=SEVEN) == tuple(range(11, 18))  # one per category
    assert slot_map(8, contiguous=False, origin="ck", dataset=SEVEN) == (0, *range(11, 18))  # background slot 0
    assert slot_map(7, contiguous=True, origin="ck", dataset=SEVEN) == tuple(range(11, 18))
    assert slot_map(91, contiguous=False, origin="ck", dataset=None) is None  # the caller's default applies
    with pytest.raises(MfdetrError, match=r"ck has 8 class slots, the dataset has 7 categories .*--categories"):
        slot_map(8, contiguous=True, origin="ck", dataset=SEVEN, dataset_path="ann.json")  # detrex: no slot 0
    with pytest.raises(MfdetrError, match=r"ann.json: ck has 12 class slots.*ids \[11, 12"):
        slot_map(12, contiguous=False, origin="ck", dataset=SEVEN, dataset_path="ann.json")


def test_a_categories_list_names_the_slots_in_order(tmp_path: Path) -> None:
    order = [(17, "z"), (11, "a"), (40, "extra"), *SEVEN[1:5], (41, "more")]  # no 16
    listed = read_categories(_write(tmp_path / "l.json", [{"id": i, "name": n} for i, n in order]))
    assert listed == order  # a list keeps its order
    assert slot_map(8, contiguous=True, origin="ck", dataset=SEVEN[:5], listed=listed) == tuple(i for i, _ in order)
    assert slot_map(9, contiguous=False, origin="ck", listed=listed) == (0, *(i for i, _ in order))
    assert slot_map(42, contiguous=False, origin="ck", listed=listed)[40] == 40  # ids below the slot count
    with pytest.raises(MfdetrError, match=r"l.json: lists 8 categories .* ck has 20 class slots"):
        slot_map(20, contiguous=True, origin="ck", listed=listed, listed_path=tmp_path / "l.json")
    with pytest.raises(MfdetrError, match=r"l.json: disagrees with the dataset ann.json: .*ids \[16\]"):
        slot_map(
            8,
            contiguous=False,
            origin="ck",
            dataset=SEVEN,
            dataset_path="ann.json",
            listed=listed,
            listed_path=tmp_path / "l.json",
        )
    coco = _write(
        tmp_path / "instances.json", {"images": [], "categories": [{"id": 3, "name": "b"}, {"id": 1, "name": "a"}]}
    )
    assert read_categories(coco) == [(1, "a"), (3, "b")]  # a COCO file: sorted by id


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "categories file not found"),
        ("{not json", "not a readable JSON file"),
        ({"images": []}, "non-empty JSON list"),
        ([{"name": "x"}], "categories[0] needs a non-negative integer 'id'"),
        ([{"id": "3", "name": "x"}], "categories[0] needs a non-negative integer 'id'"),
        ([{"id": 3, "name": "x"}, {"id": 3, "name": "y"}], "category ids repeat: [3]"),
    ],
)
def test_bad_categories_files_are_one_line_errors(tmp_path: Path, content, needle) -> None:
    p = tmp_path / "cats.json"
    if content is not None:
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(MfdetrError) as e:
        read_categories(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_prediction_names(tmp_path: Path) -> None:
    c2c = (0,) * 11 + tuple(range(11, 18))
    assert category_names(c2c) == {i: f"class {i}" for i in range(11, 18)}  # not COCO's names for a custom head
    assert category_names(c2c, recorded=dict(SEVEN)) == dict(SEVEN)
    listed = _write(tmp_path / "n.json", [{"id": 11, "name": "eleven"}])
    assert category_names(c2c, recorded=dict(SEVEN), categories_file=listed)[11] == "eleven"
    assert category_names(tuple(range(91)))[1] == "person"  # a COCO head keeps COCO's names by default
    synth = tuple(s.id for s in SYNTH_CLASSES)  # no dataset is special: names come from a record or a file
    assert category_names(synth)[1] == "class 1"
    assert category_names(synth, recorded={s.id: s.name for s in SYNTH_CLASSES})[1] == "disc"
    with pytest.raises(MfdetrError, match="none of the ids the detector head predicts"):
        category_names(c2c, categories_file=_write(tmp_path / "o.json", [{"id": 1, "name": "x"}]))


def test_synth_category_ids_option(tmp_path: Path) -> None:
    assert synth_classes(SynthConfig()) == SYNTH_CLASSES  # the default set is unchanged
    classes = synth_classes(SynthConfig(num_classes=8, first_category_id=11))
    assert [c.id for c in classes] == list(range(11, 19)) and len({c.name for c in classes}) == 8
    assert len({(c.shape, c.texture) for c in synth_classes(SynthConfig(num_classes=36))}) == 36
    out = tmp_path / "s"
    generate_synth(out, config=SynthConfig(train=6, val=1, image_size=48, num_classes=7, first_category_id=11))
    data = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(11, 18))
    assert {a["category_id"] for a in data["annotations"]} <= set(range(11, 18)) and data["annotations"]
    for bad in ({"num_classes": 0}, {"num_classes": 37}, {"first_category_id": 0}):
        with pytest.raises(MfdetrError, match="synth: --"):
            SynthConfig(**bad)


def test_per_category_ap(tmp_path: Path) -> None:
    out = tmp_path / "s"
    generate_synth(out, config=SynthConfig(train=0, val=12, image_size=48, num_classes=7, first_category_id=11, seed=1))
    gt = load_coco_gt(out / "annotations" / "instances_val2017.json")
    res = gt_to_results(gt)
    present = sorted({r["category_id"] for r in res})
    dropped = present[0]
    per: dict[int, float] = {}
    summary = evaluate(gt, [r for r in res if r["category_id"] != dropped], "bbox", per_category=per)
    assert set(per) == set(range(11, 18))
    assert per[dropped] == 0.0 and all(per[c] == 100.0 for c in present[1:])
    scored = [v for v in per.values() if not math.isnan(v)]
    assert summary["AP"] == pytest.approx(sum(scored) / len(scored))  # COCO's AP: the mean over categories
    ev = CocoEvaluator(coco_gt=gt, iou_types=("segm", "bbox"), all_images=True)
    ev.process(res)
    ev.finish()
    rows = {c: {"name": f"n{c}", **{t: ev.category_ap[t][c] for t in ("segm", "bbox")}} for c in present}
    table = format_category_table(rows).splitlines()
    assert table[0].split() == ["id", "category", "segm", "bbox"] and len(table) == len(present) + 1
    assert table[1].split() == [str(present[0]), f"n{present[0]}", "100.00", "100.00"]


def test_dino_eval_resize_from_its_args() -> None:
    p = eval_preprocessing({"data_aug_scales": [480, 800, 640], "data_aug_max_size": 1000})
    assert (p.short_side, p.max_size) == (800, 1000)
    assert eval_preprocessing({"nheads": 8}) is None
    with pytest.raises(MfdetrError, match="args.data_aug_scales"):
        eval_preprocessing({"data_aug_scales": "800"})


def test_preset_files_keep_the_slot_map_and_the_resize(tmp_path: Path) -> None:
    from mfdetr.detectors.resolve import resolve_detector
    from tests._checkpoint_files import DINO_ARGS, detrex_file, save_checkpoint, tiny_model
    from tests.conftest import cli_output

    ckpt = save_checkpoint(
        tmp_path / "mine.pth", tiny_model("dino"), {**DINO_ARGS, "data_aug_scales": [64, 72], "data_aug_max_size": 96}
    )
    ann = _write(tmp_path / "instances.json", {"images": [], "categories": [{"id": i, "name": n} for i, n in SEVEN]})
    code, out = cli_output("detectors", "save", tmp_path / "mine.json", "--checkpoint", ckpt, "--categories", ann)
    assert code == 0, out
    rec = json.loads((tmp_path / "mine.json").read_text())
    assert rec["class_to_category"] == [0] * 11 + list(range(11, 18)) + [0] * 73  # 91 slots, slot = id
    assert (rec["preprocessing"]["short_side"], rec["preprocessing"]["max_size"]) == (72, 96)
    det = resolve_detector(str(tmp_path / "mine.json"), ckpt)
    assert list(det.preset.class_to_category) == rec["class_to_category"] and det.preset.preprocessing.max_size == 96
    _write(tmp_path / "bad.json", {**rec, "name": "bad", "class_to_category": [1, 2]})
    with pytest.raises(MfdetrError, match="class_to_category must list 91"):
        resolve_detector(str(tmp_path / "bad.json"), ckpt)
    _, detrex = detrex_file(tmp_path / "detrex.pth")
    code, out = cli_output("detectors", "save", tmp_path / "d.json", "--checkpoint", detrex)
    assert code != 0 and "detrex checkpoint numbers its classes" in out and not (tmp_path / "d.json").exists()
