"""The box-prompted SAM baseline (``mfdetr eval --baseline sam``) with a tiny, randomly initialised SAM
built from the segment-anything package's own modules: prompt frame, pasted masks, results JSON and
table of the real command on a cache of the shipped ``demo`` detector, and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mfdetr.engine.inference import sam_baseline
from mfdetr.engine.inference.sam_model import SAM_SPECS, SamSpec, build_sam_model, load_sam
from tests.conftest import cli, refused

# SAM's architecture at toy sizes: a 64-px input, 4-px patches (a 16 × 16 embedding, 64 × 64 low-res masks)
TINY = SamSpec(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=64,
    patch_size=4,
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=4,
    decoder_depth=1,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)
DEEPER = SamSpec(**{**TINY.__dict__, "encoder_depth": 3, "encoder_global_attn_indexes": (2,)})


@pytest.fixture
def tiny_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SAM_SPECS, "tiny", TINY)
    monkeypatch.setitem(SAM_SPECS, "deeper", DEEPER)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam_model(TINY).state_dict(), path)
    return path


def box_decoder(sam: torch.nn.Module, prompts: list[torch.Tensor]) -> None:
    """Record the box prompts SAM gets, and make its decoder answer each with the box itself (logit +20
    inside the prompt box on the low-res grid of the padded input, -20 outside)."""

    def grab(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        prompts.append(kwargs["boxes"].detach().cpu().clone())

    def boxes_as_masks(_m: Any, _args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        masks, iou = out
        side = masks.shape[-1]
        c = (torch.arange(side, dtype=torch.float32) + 0.5) * (TINY.image_size / side)  # cell centres
        b = prompts[-1]
        inside = (
            (c[None, :, None] >= b[:, 1, None, None])
            & (c[None, :, None] < b[:, 3, None, None])
            & (c[None, None, :] >= b[:, 0, None, None])
            & (c[None, None, :] < b[:, 2, None, None])
        )
        return torch.where(inside, 20.0, -20.0)[:, None].to(masks.dtype), iou

    sam.prompt_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    sam.mask_decoder.register_forward_hook(boxes_as_masks)


def test_prompts_are_resized_boxes_and_masks_land_in_the_boxes(sam_file: Path, tiny_specs: None) -> None:
    from segment_anything import SamPredictor

    sam = load_sam(sam_file, "tiny")
    prompts: list[torch.Tensor] = []
    box_decoder(sam, prompts)
    h0, w0 = 80, 120  # the long side 120 → 64: scale 64/120, input 43 × 64 (then padded to 64 × 64)
    image = np.random.default_rng(0).integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [60.0, 0.0, 120.0, 40.0], [0.0, 45.0, 30.0, 80.0]])
    masks = sam_baseline.sam_image_masks(SamPredictor(sam), image, boxes)
    assert masks.shape == (3, h0, w0) and masks.dtype == torch.bool
    s = 64 / 120
    torch.testing.assert_close(prompts[0], boxes * torch.tensor([s, 43 / 80, s, 43 / 80]))
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        want = torch.zeros(h0, w0, dtype=torch.bool)
        want[y0:y1, x0:x1] = True
        iou = (m & want).sum() / (m | want).sum()
        assert iou > 0.9, (x0, y0, x1, y1, float(iou))


def test_original_boxes_from_normalised_cxcywh() -> None:
    b = torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.9, 0.1, 0.4, 0.4]])
    got = sam_baseline.original_boxes(b, (80, 120))
    torch.testing.assert_close(got, torch.tensor([[30.0, 30.0, 90.0, 50.0], [84.0, 0.0, 120.0, 24.0]]))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three synthetic images cached by the shipped ``demo`` detector, and a MaskNet trained 2 steps on them."""
    from mfdetr.cache import CacheJob, run_cache
    from mfdetr.data.synth import SynthConfig, generate_synth
    from mfdetr.detectors import get_preset
    from mfdetr.detectors.defaults import shipped_weights
    from mfdetr.engine import build_run_config
    from mfdetr.engine.stage2 import CacheSources, train_from_cache

    root = tmp_path_factory.mktemp("samcache")
    generate_synth(root / "coco", config=SynthConfig(train=0, val=3, image_size=64, seed=1))
    weights = shipped_weights(get_preset("demo"))
    run_cache(
        CacheJob(
            detector="demo",
            checkpoint=weights,
            coco=root / "coco",
            split="val2017",
            out=root / "cache",
            topk=10,
            enc_layers=(2,),
            num_workers=0,
        ),
        progress=False,
        echo=lambda *a, **k: None,
    )
    cfg = build_run_config(
        {
            "train": {
                "device": "cpu",
                "iterations": 2,
                "batch_size": 1,
                "num_workers": 0,
                "progress": False,
                "log_every": 1,
            },
            "masknet": {"num_queries": 10},
        },
        [],
    )
    train_from_cache(cfg, CacheSources(cache=root / "cache", coco=root / "coco"), root / "run", log=lambda s: None)
    return {"root": root, "coco": root / "coco", "cache": root / "cache", "ckpt": root / "run" / "ckpt.pt"}


def sam_eval(*args: Any) -> subprocess.CompletedProcess[str]:
    """``mfdetr eval ARGS`` in this process."""
    return cli("eval", *args)


def expected_boxes(cache: Path, topk: int) -> dict[int, np.ndarray]:
    """Per image id: the top-``topk`` cached boxes (by class score) as xyxy in the original image, computed here."""
    import zarr

    g = zarr.open_group(str(cache), mode="r")
    out = {}
    for i, iid in enumerate(g["image_ids"][:].tolist()):
        cx, cy, w, h = np.asarray(g["boxes"][i], dtype=np.float64).T
        h0, w0 = (float(v) for v in g["orig_hw"][i])
        xyxy = np.stack(
            [
                np.clip((cx - w / 2) * w0, 0, w0),
                np.clip((cy - h / 2) * h0, 0, h0),
                np.clip((cx + w / 2) * w0, 0, w0),
                np.clip((cy + h / 2) * h0, 0, h0),
            ],
            axis=1,
        )
        score = 1 / (1 + np.exp(-np.asarray(g["logits"][i], dtype=np.float64)))
        keep = score.argmax(1) > 0  # slot 0 is no category
        order = np.argsort(-score.max(1)[keep], kind="stable")
        out[int(iid)] = xyxy[keep][order][:topk]
    return out


def test_cli_compares_sam_and_masknet_on_a_demo_cache(
    demo_cache: dict[str, Path], sam_file: Path, tiny_specs: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mfdetr.evaluation import load_coco_gt, read_results_json

    seen: dict[tuple[int, int], torch.Tensor] = {}
    real = sam_baseline.sam_image_masks

    def spy(predictor: Any, image: np.ndarray, boxes: torch.Tensor, clock: Any = lambda s: None) -> torch.Tensor:
        seen[image.shape[:2]] = boxes.clone()
        return real(predictor, image, boxes, clock)

    monkeypatch.setattr(sam_baseline, "sam_image_masks", spy)
    out = tmp_path / "sam.json"
    r = sam_eval(
        "--cache",
        demo_cache["cache"],
        "--baseline",
        "sam",
        "--sam-checkpoint",
        sam_file,
        "--sam-model",
        "tiny",
        "--sam-topk",
        4,
        "--masknet",
        demo_cache["ckpt"],
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "segm", "AP"] and "boundary AP" in lines[0]
    assert lines[1].startswith("SAM tiny (box prompts)") and lines[2].startswith("MaskNet run")
    for row in lines[1:3]:
        ms = float(row.split()[-1])
        aps = [float(v) for v in row.split()[-8:-1]]  # an area range without GT is nan
        assert ms > 0 and all(0 <= v <= 100 for v in aps if not math.isnan(v)) and not math.isnan(aps[0]), row
    assert "3 images on cpu" in r.stdout and "sam image encoder" in r.stdout
    gt = load_coco_gt(demo_cache["coco"] / "annotations" / "instances_val2017.json")
    res = read_results_json(out, gt, ("segm", "boundary"))
    want = expected_boxes(demo_cache["cache"], 4)
    sizes = {iid: (gt.imgs[iid]["height"], gt.imgs[iid]["width"]) for iid in want}
    assert set(seen) == set(sizes.values())  # every image (distinct sizes here) was prompted once
    for iid, boxes in want.items():
        np.testing.assert_allclose(seen[sizes[iid]].numpy(), boxes, atol=1e-3)
        mine = [d for d in res if d["image_id"] == iid]
        assert len(mine) == len(boxes)
        np.testing.assert_allclose(
            [d["bbox"] for d in mine], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], atol=1e-3
        )
        assert all(d["segmentation"]["size"] == list(sizes[iid]) for d in mine)
    scores = [d["score"] for d in res]
    assert all(0 < s < 1 for s in scores) and len(set(scores)) > 1  # the detector's class scores
    # the results file scores like any results file, to the AP the table shows
    e = cli("eval-json", "--coco", demo_cache["coco"], "--results", out)
    assert e.returncode == 0, e.stdout + e.stderr
    row = next(ln for ln in e.stdout.splitlines() if ln.startswith("segm"))
    assert abs(float(row.split()[1]) - float(lines[1].split()[-8])) < 0.01, (row, lines[1])


def test_missing_extra_is_one_line(
    demo_cache: dict[str, Path], sam_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "segment_anything" or m.startswith("segment_anything.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    refused(
        sam_eval("--cache", demo_cache["cache"], "--baseline", "sam", "--sam-checkpoint", sam_file),
        "segment-anything",
        ".[sam]",
    )


def test_bad_weights_are_one_line(
    demo_cache: dict[str, Path], sam_file: Path, tiny_specs: None, tmp_path: Path
) -> None:
    base = ("--cache", demo_cache["cache"], "--baseline", "sam", "--device", "cpu", "--sam-checkpoint")
    refused(sam_eval(*base, tmp_path / "nope.pth", "--sam-model", "tiny"), "nope.pth", "not found")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    refused(sam_eval(*base, tmp_path / "list.pth", "--sam-model", "tiny"), "list.pth", "not a SAM state dict")
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, tmp_path / "other.pth")
    refused(sam_eval(*base, tmp_path / "other.pth", "--sam-model", "tiny"), "not a SAM state dict", "patch_embed")
    refused(sam_eval(*base, sam_file, "--sam-model", "deeper"), "sam_tiny.pth", "2 blocks", "pass --sam-model tiny")
    refused(sam_eval(*base, sam_file), "--sam-model vit_h has width 1280", "pass --sam-model tiny")
    refused(sam_eval(*base, sam_file, "--sam-model", "vit_x"), "unknown --sam-model 'vit_x'")
    state = torch.load(sam_file, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "cut.pth")
    refused(
        sam_eval(*base, tmp_path / "cut.pth", "--sam-model", "tiny"),
        "weights do not fit SAM tiny",
        "mask_decoder.iou_token.weight",
    )
    refused(sam_eval("--cache", demo_cache["cache"], "--baseline", "sam"), "--sam-checkpoint")
    refused(sam_eval(*base, sam_file, "--baseline", "medsam"), "unknown --baseline 'medsam'")
    refused(sam_eval(*base, sam_file, "--sam-model", "tiny", "--config", tmp_path / "x.toml"), "no --online, --config")


def test_images_that_are_not_the_cached_ones(
    demo_cache: dict[str, Path], sam_file: Path, tiny_specs: None, tmp_path: Path
) -> None:
    from PIL import Image

    base = (
        "--cache",
        demo_cache["cache"],
        "--baseline",
        "sam",
        "--device",
        "cpu",
        "--sam-checkpoint",
        sam_file,
        "--sam-model",
        "tiny",
        "--images",
        tmp_path,
        "--out",
        tmp_path / "r.json",
    )
    first = min((demo_cache["coco"] / "val2017").iterdir())
    refused(sam_eval(*base), first.name, "missing image file")
    with Image.open(first) as im:
        im.resize((im.width + 3, im.height)).save(tmp_path / first.name)
    refused(sam_eval(*base), first.name, "the cache recorded")
    assert not (tmp_path / "r.json").exists()
    json.dumps(SAM_SPECS["vit_b"].__dict__)  # the published sizes are plain data
    assert (
        SAM_SPECS["vit_b"].encoder_embed_dim,
        SAM_SPECS["vit_l"].encoder_depth,
        SAM_SPECS["vit_h"].encoder_global_attn_indexes,
    ) == (768, 24, (7, 15, 23, 31))
