"""The shipped schema (cache_schemas/v1): files load as package resources, the validator (jsonschema)
names each broken field on one line, the markdown table matches the JSON table."""

from __future__ import annotations

import copy
import re
from importlib import resources

import jsonschema
import pytest

import tests._fake_detector as fd
from mfdetr.cache import build_manifest, load_array_table, load_manifest_schema, resolve_array_table
from mfdetr.cache.manifest import canvas_for, check_expectations, validate_manifest_data
from mfdetr.cache.schema import validate_json
from mfdetr.errors import MfdetrError


def manifest(**kw):
    base = dict(
        preset=fd.PRESET,
        checkpoint_file="/x/fake.pth",
        checkpoint_sha256="a" * 64,
        split="val2017",
        annotation_file="/c/annotations/instances_val2017.json",
        annotation_sha256="b" * 64,
        image_ids=[3, 9, 12],
        topk=8,
        enc_layers=[6, 4],
    )
    base.update(kw)
    return build_manifest(**base)


def test_schema_ships_with_the_package():
    base = resources.files("mfdetr") / "_schemas"
    assert (base / "v1" / "manifest.schema.json").is_file() and (base / "v1" / "arrays.md").is_file()
    assert load_manifest_schema()["properties"]["schema_version"]["const"] == 1


def test_markdown_table_matches_json_table():
    md = (resources.files("mfdetr") / "_schemas" / "v1" / "arrays.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", md, flags=re.M)}
    table = load_array_table()
    assert sorted(rows) == sorted(a["name"] for a in table)
    for a in table:
        cells = [c.strip() for c in rows[a["name"]].strip("|").split("|")]
        assert cells[1] == "[" + ", ".join(map(str, a["shape"])) + "]", a["name"]
        assert cells[2].startswith("float32" if a["dtype"] == "logits" else a["dtype"]), a["name"]
        assert cells[3] == "[" + ", ".join(map(str, a["chunks"])) + "]", a["name"]
        assert cells[4] == ("[" + ", ".join(map(str, a["inner_chunks"])) + "]" if a.get("inner_chunks") else "-")
        assert cells[5] == a["codec"], a["name"]


def test_built_manifest_resolves_the_array_table():
    m = manifest()
    assert validate_manifest_data(m) == []
    assert m["enc_layers"] == [4, 6] and m["checkpoint"]["file"] == "fake.pth"
    assert m["canvas"] == {
        "input_hw": [128, 128],
        "level_hw": [[16, 16], [8, 8], [4, 4], [2, 2]],
        "c1_hw": [32, 32],
        "level_tile": [16, 8, 4, 2],
        "c1_tile": 16,
    }
    specs = {s.name: s for s in resolve_array_table(m)}
    assert specs["enc_layer6_level1"].shape == (3, 16, 8, 8) and specs["enc_layer6_level1"].chunks == (1, 16, 8, 8)
    assert specs["logits"].dtype == "float32" and specs["queries"].dtype == "float16"
    assert specs["commit"].codec == "none" and specs["image_ids"].chunks == (3,)
    assert all(s.chunks[0] == 1 for n, s in specs.items() if n != "image_ids")  # one image per chunk
    assert specs["c1"].inner_chunks == (1, 8, 16, 16) and specs["enc_layer4_level0"].inner_chunks is None
    r50 = canvas_for(1333, (8, 16, 32, 64))  # 1333 → 1344 = 21 × 64
    assert r50["level_hw"][0] == [168, 168] and r50["c1_hw"] == [336, 336]
    assert r50["c1_tile"] == 48 and r50["level_tile"] == [24, 21, 21, 21]
    with pytest.raises(MfdetrError, match="encoder layers 1..6"):
        manifest(enc_layers=[7])


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("topk",), 0, "manifest.topk: must be >= 1"),
        (("checkpoint", "sha256"), "xyz", "manifest.checkpoint.sha256"),
        (("canvas", "level_hw"), [[16, 16, 1]], "manifest.canvas.level_hw[0]: expected at most 2 items"),
        (("dtypes", "features"), "float32", "manifest.dtypes.features: must be one of"),
        (("extra",), 1, "unexpected field 'extra'"),
        (("format",), "zarr", "not an mfdetr cache manifest"),
        (("schema_version",), 9, "unknown cache schema version 9"),
    ],
)
def test_validator_names_the_broken_field(path, value, needle):
    m = copy.deepcopy(manifest())
    cur = m
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    errs = validate_manifest_data(m)
    assert any(needle in e for e in errs), errs
    del m["source"]
    if path[-1] not in ("format", "schema_version"):
        assert any("missing required field 'source'" in e for e in validate_manifest_data(m))


def test_validator_agrees_with_jsonschema():
    schema = load_manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    good = manifest()
    jsonschema.validate(good, schema)
    validator = jsonschema.Draft202012Validator(schema)
    mutations = [
        ("canvas", "c1_hw", [32]),
        ("source", "split", ""),
        ("checkpoint", "file", 3),
        ("preprocessing", "mean", [0.5, "x", 0.5]),
        ("codecs", "commit", {"name": "zstd"}),
        ("detector", "hidden_dim", 0),
        ("dtypes", "logits", "float16"),
    ]
    for outer, inner, value in mutations:
        bad = copy.deepcopy(good)
        bad[outer][inner] = value
        assert (validate_json(bad, schema) == []) == validator.is_valid(bad), (outer, inner, value)


def test_validator_checks_every_keyword_and_refuses_a_broken_schema():
    assert validate_json(2, {"type": "integer", "multipleOf": 2}) == []
    assert validate_json(3, {"type": "integer", "multipleOf": 2}, "x") == ["x: 3 is not a multiple of 2"]
    with pytest.raises(ValueError, match="invalid schema"):
        validate_json(1, {"type": "integr"})


def test_expectations():
    m = manifest()
    check_expectations(m, {"detector.name": fd.NAME, "enc_layers": [4], "topk": 8}, where="s")
    with pytest.raises(
        MfdetrError,
        match=r"s: cache was made with detector.name=\"fake_tiny\", but this command "
        r"expects \"dino_r50\"",
    ):
        check_expectations(m, {"detector.name": "dino_r50"}, where="s")
    with pytest.raises(MfdetrError, match=r"layers \[5\] were asked for"):
        check_expectations(m, {"enc_layers": [4, 5]}, where="s")
