"""A tiny deterministic fake frozen detector for the cache tests, a tiny COCO folder writer, and the tiny
MaskNet, caches and run configs that stage-2 tests build on it.

``fake_tiny`` has the shapes of a real 4-scale DINO at toy sizes: levels at strides 8/16/32/64 with
``d = 16`` channels, C1 (stride 4, 8 channels, ReLU'd so it has zeros like a ResNet stage), K of
``Q = 40`` candidate queries with 6 class logits and normalised cxcywh boxes, 6 encoder layers.
Every output of an image is a pure function of that image's **valid** pixels (the detector pads each
image itself), so results do not depend on batch composition — resumed runs must match uninterrupted
ones bit for bit. Padding of the returned batch maps is filled with ``7.0`` so tests can check that the
cache stores zeros there.

Importing this module registers ``fake_tiny`` (idempotent): it is the plugin that subprocess tests
select with ``MFDETR_PLUGINS=tests._fake_detector``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mfdetr.contracts import DetectorOutput, DetectorPreset, ImageBatch, Preprocessing
from mfdetr.detectors.registry import list_detectors, register_detector

NAME = "fake_tiny"
D, C1, NUM_CLASSES, NUM_CANDIDATES, STRIDES, LAYERS = 16, 8, 6, 40, (8, 16, 32, 64), 6
PAD_VALUE = 7.0

PRESET = DetectorPreset(
    name=NAME,
    family="fake",
    arch={"hidden_dim": D, "candidates": NUM_CANDIDATES},
    checkpoint_file="fake.pth",
    checkpoint_sha256=None,
    box_ap=None,
    num_classes=NUM_CLASSES,
    class_to_category=(0, 1, 2, 3, 0, 5),
    preprocessing=Preprocessing(short_side=48, max_size=80),
    level_strides=STRIDES,
    hidden_dim=D,
    c1_channels=C1,
    num_encoder_layers=LAYERS,
    notes="test-only fake detector",
)


def fake_state_dict(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    return {
        "c1.weight": r(C1, 3, 4, 4, scale=0.3),
        "c1.bias": r(C1, scale=0.1),
        "proj.weight": r(len(STRIDES), D, 3),
        "proj.bias": r(len(STRIDES), D, scale=0.1),
        "query_embed": r(NUM_CANDIDATES, D),
        "base.weight": r(D, 3 * len(STRIDES), scale=0.5),
        "cls.weight": r(NUM_CLASSES, D),
        "box.weight": r(4, D, scale=0.5),
    }


def save_fake_checkpoint(path: str | Path, seed: int = 0) -> Path:
    torch.save(fake_state_dict(seed), path)
    return Path(path)


class FakeDetector(nn.Module):
    """Deterministic toy detector with realistic output shapes (see module doc)."""

    def __init__(self, *, state: dict[str, Tensor]) -> None:
        super().__init__()
        want = set(fake_state_dict())
        if set(state) != want:
            raise KeyError(f"fake checkpoint keys {sorted(state)} != {sorted(want)}")
        for k, v in state.items():
            self.register_buffer(k.replace(".", "_"), v.float())
        self.preset = PRESET
        self.nan_image_ids: set[int] = set()
        self.forward_calls = 0

    def _one(self, x: Tensor, enc_layers: Sequence[int], topk: int) -> dict[str, Any]:
        _, h, w = x.shape
        e = 64
        xp = F.pad(x, (0, -(-w // e) * e - w, 0, -(-h // e) * e - h))[None]
        c1 = F.relu(F.conv2d(xp, self.c1_weight, self.c1_bias, stride=4))[0, :, : math.ceil(h / 4), : math.ceil(w / 4)]
        levels, pooled = [], []
        for lvl, s in enumerate(STRIDES):
            p = F.avg_pool2d(xp, s, s)[0, :, : math.ceil(h / s), : math.ceil(w / s)]
            pooled.append(p.mean(dim=(1, 2)))
            levels.append(torch.einsum("dc,chw->dhw", self.proj_weight[lvl], p) + self.proj_bias[lvl][:, None, None])
        enc = {}
        for layer in enc_layers:
            enc[layer] = [
                F.layer_norm((m * (1 + 0.25 * layer) + torch.sin(layer * m)).permute(1, 2, 0), (D,)).permute(2, 0, 1)
                for m in levels
            ]
        base = self.base_weight @ torch.cat(pooled)
        q = F.layer_norm(self.query_embed + base, (D,))
        logits = q @ self.cls_weight.T
        order = torch.sort(logits.sigmoid().amax(-1), descending=True, stable=True).indices[:topk]
        q, logits = q[order], logits[order]
        boxes = (q @ self.box_weight.T).sigmoid()
        return {
            "q": q,
            "b": boxes,
            "l": logits,
            "enc": enc,
            "c1": c1,
            "valid": [[math.ceil(h / s), math.ceil(w / s)] for s in STRIDES],
        }

    @torch.inference_mode()
    def detect(self, batch: ImageBatch, *, topk: int = 100, enc_layers: Sequence[int] = (4,)) -> DetectorOutput:
        self.forward_calls += 1
        time.sleep(float(os.environ.get("MFDETR_FAKE_SLEEP", "0")))  # lets subprocess tests kill a run mid-way
        topk = min(topk, NUM_CANDIDATES)
        outs = [
            self._one(batch.images[b, :, : int(hw[0]), : int(hw[1])].float(), enc_layers, topk)
            for b, hw in enumerate(batch.input_hw.tolist())
        ]
        hp, wp = batch.images.shape[-2:]

        def pad(maps: list[Tensor], hh: int, ww: int) -> Tensor:
            out = maps[0].new_full((len(maps), maps[0].shape[0], hh, ww), PAD_VALUE)
            for i, m in enumerate(maps):
                out[i, :, : m.shape[1], : m.shape[2]] = m
            return out

        logits = torch.stack([o["l"] for o in outs])
        for b, iid in enumerate(batch.image_ids):
            if iid in self.nan_image_ids:
                logits[b, 0, 0] = float("nan")
        return DetectorOutput(
            queries=torch.stack([o["q"] for o in outs]),
            boxes=torch.stack([o["b"] for o in outs]),
            logits=logits,
            enc_maps={
                layer: [
                    pad([o["enc"][layer][lvl] for o in outs], -(-hp // s), -(-wp // s)) for lvl, s in enumerate(STRIDES)
                ]
                for layer in enc_layers
            },
            c1=pad([o["c1"] for o in outs], -(-hp // 4), -(-wp // 4)),
            input_hw=batch.input_hw.clone(),
            orig_hw=batch.orig_hw.clone(),
            level_valid_hw=torch.tensor([o["valid"] for o in outs], dtype=torch.int64),
        )


def build_fake(*, checkpoint: str | Path | dict[str, Any] | None = None, device: str = "cpu") -> FakeDetector:
    if checkpoint is None:
        state = fake_state_dict(0)
    elif isinstance(checkpoint, dict):
        state = checkpoint
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return FakeDetector(state=state).to(device).eval().requires_grad_(False)


def register() -> None:
    """Register ``fake_tiny`` unless it already is."""
    if NAME not in list_detectors():
        register_detector(PRESET, build_fake)


register()


# --- a tiny COCO folder -------------------------------------------------------------------------------
def make_coco(
    root: str | Path, *, n: int = 6, split: str = "val2017", corrupt: Sequence[int] = (), seed: int = 0
) -> Path:
    """Write ``n`` small RGB JPEG/PNG images (ids 1..n, mixed orientations) + instances JSON.

    Images listed in ``corrupt`` (ids) get a file that is not an image. Image 2 has no annotation.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n + 1):
        h, w = [(30, 44), (50, 34), (40, 40), (24, 70), (36, 52), (44, 28)][(i - 1) % 6]
        name = f"{i:06d}.png"
        if i in corrupt:
            (root / split / name).write_bytes(b"this is not an image")
        else:
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            arr[h // 4 : h // 2, w // 4 : w // 2] = [200, 30, 30]
            Image.fromarray(arr).save(root / split / name)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        if i != 2:
            x0, y0, x1, y1 = w // 4, h // 4, w // 2, h // 2
            anns.append(
                {
                    "id": i,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
    cats = [{"id": 1, "name": "thing", "supercategory": "thing"}]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def cache_args(coco: Path, out: Path, *extra: str, enc_layers: str = "4,6") -> list[str]:
    """``mfdetr cache`` arguments for ``fake_tiny`` on the ``val2017`` split of :func:`make_coco`'s folder
    (checkpoint ``coco/fake.pth``). Batch size 1: bit-identical comparisons hold even for a detector whose
    outputs depend on batch padding."""
    return [
        "cache",
        "--detector",
        NAME,
        "--checkpoint",
        str(coco / "fake.pth"),
        "--coco",
        str(coco),
        "--split",
        "val2017",
        "--out",
        str(out),
        "--topk",
        "8",
        "--enc-layers",
        enc_layers,
        "--batch-size",
        "1",
        "--workers",
        "0",
        *extra,
    ]


# --- stage 2 on a fake_tiny cache ---------------------------------------------------------------------
# MaskNet scaled to the fake detector (d = 16, C1 = 8 channels, K = 8 cached queries)
TINY = {
    "num_queries": 8,
    "roi_size": 8,
    "image_encoder": {"layers": 1, "heads": 2, "points": 2},
    "box_encoder": {"layers": 1, "dim": 8, "heads": 2, "points": 2},
    "query_encoder": {"heads": 2},
    "neck": {"groups": 4},
    "mask_scoring": {"channels": 8, "fc_dim": 16},
}


def make_oracle(store: Path, annotation_file: Path) -> None:
    """Overwrite a cache's boxes/logits with the GT (query k = annotation k, class slot 1 = category 1):
    the cached detector is then perfect (box AP 100) and a trained MaskNet can reach mask AP 100."""
    import numpy as np
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    d = json.loads(annotation_file.read_text())
    imgs = {im["id"]: im for im in d["images"]}
    anns: dict[int, list[dict[str, object]]] = {}
    for a in d["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for i, iid in enumerate(g["image_ids"][:].tolist()):
        boxes = g["boxes"][i]
        logits = np.full(g["logits"][i].shape, -10.0, dtype=g["logits"].dtype)
        for k, a in enumerate(anns.get(iid, [])):
            x, y, w, h = a["bbox"]  # type: ignore[misc]
            wi, hi = imgs[iid]["width"], imgs[iid]["height"]
            boxes[k] = [(x + w / 2) / wi, (y + h / 2) / hi, w / wi, h / hi]
            logits[k, 1] = 10.0
        g["boxes"][i] = boxes
        g["logits"][i] = logits


def tiny_cfg(**train: object) -> dict[str, object]:
    base = {"device": "cpu", "iterations": 4, "batch_size": 2, "log_every": 1, "num_workers": 0, "progress": False}
    base.update(train)
    return {"train": base, "masknet": TINY}


def write_cache(coco: Path, split: str, out: Path, ckpt: Path, **kw: object) -> Path:
    """Cache ``split`` of ``coco`` with ``fake_tiny`` (K = 8, encoder layer 4) into ``out``."""
    from mfdetr.cache import CacheJob, run_cache

    run_cache(
        CacheJob(
            detector=NAME,
            checkpoint=ckpt,
            coco=coco,
            split=split,
            out=out,
            topk=8,
            enc_layers=(4,),
            num_workers=0,
            **kw,
        ),
        progress=False,
        echo=lambda *a, **k: None,
    )
    return out


def toml_table(prefix: str, d: dict[str, object]) -> list[str]:
    """The lines of TOML table ``[prefix]`` holding ``d`` (one level of nested tables as dotted keys)."""
    lines = [f"[{prefix}]"]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"{k}.{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    return lines


def write_run_config(path: Path, **train: object) -> Path:
    """A run config file: ``[train]`` holding ``train`` and ``[masknet]`` holding :data:`TINY`."""
    path.write_text("\n".join(toml_table("train", train) + toml_table("masknet", TINY)) + "\n")
    return path


# --- damaging a store -----------------------------------------------------------------------------------
#: damage kind → (store index, array) in a store of 6 images; CHEAP ones are found from files and flags alone
KINDS = {
    "missing_shard": (2, "c1"),
    "missing_chunk": (1, "boxes"),
    "emptied": (4, "queries"),
    "truncated": (3, "c1"),
    "flipped": (4, "logits"),
    "nan": (5, "queries"),
    "commit": (0, "commit"),
    "bad_size": (1, "input_hw"),
}
CHEAP = ("missing_shard", "missing_chunk", "emptied", "commit")


def damage(store: Path, kind: str) -> int:
    """Damage image ``KINDS[kind]`` of ``store`` the way a user's disk would; return its image id."""
    from mfdetr.cache.store import chunk_path

    index, name = KINDS[kind]
    g = zarr.open_group(str(store), mode="r+")
    path = chunk_path(store, g[name], index)
    if kind.startswith("missing"):
        path.unlink()  # an interrupted rsync
    elif kind == "emptied":
        path.write_bytes(b"")  # a full quota
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        data = bytearray(path.read_bytes())
        for k in (len(data) // 3, len(data) // 2):
            data[k] ^= 0xA5
        path.write_bytes(bytes(data))
    elif kind == "nan":  # through zarr: the checksum is valid, the values are not
        x = g[name][index]
        x[0, 0] = np.nan
        g[name][index] = x
    elif kind == "bad_size":  # through zarr: a valid chunk holding an impossible size
        g[name][index] = np.array([0, 10**6], dtype=g[name].dtype)
    else:
        path.write_bytes(bytes([7]))  # a commit byte that is not 0/1/2
    return int(g["image_ids"][index])


# --- comparing stores -----------------------------------------------------------------------------------
def read_all(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: root[name][:] for name in root.array_keys()}


def assert_same_store(a: Path, b: Path) -> None:
    xa, xb = read_all(a), read_all(b)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name
    ma = dict(zarr.open_group(str(a), mode="r").attrs["mfdetr_cache"])
    mb = dict(zarr.open_group(str(b), mode="r").attrs["mfdetr_cache"])
    ma.pop("created_utc"), mb.pop("created_utc")
    assert ma == mb
