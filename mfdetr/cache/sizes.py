"""Bytes per image of a cache under every feature codec preset and C1 mode (``mfdetr cache --dry-run``).

The estimate multiplies each image's raw float16 bytes (valid region, from the annotation's image sizes
and the store's shapes) per kind of array — encoder maps, C1, queries, the rest — by a compression
ratio per preset:

- **measured** when the target store already holds a finished image written ``lossless``: that image's
  arrays are read and encoded in memory with every preset's numcodecs chain (filters, then the data
  compressor) — real ratios for this detector;
- **assumed** otherwise: :data:`ASSUMED_RATIOS` below.

C1 mode ``store`` keeps the C1 arrays; ``recompute`` stores none (stage 2 recomputes C1 from the
image), so its bytes are those of ``store`` minus C1 (what it stores once per store instead, such as
the stage-0 weights, is not per image and not counted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np

from mfdetr.cache.codecs import PRESETS, CodecPreset, preset_of

#: raw float16 (valid region) / stored bytes per array kind and preset when nothing can be measured.
#: lossless: ResNet C1 ~1.55x (ReLU zeros), LayerNorm-ed encoder maps and queries ~1.07x (zstd-1, measured
#: on real DINO-R50 outputs). Lossy presets: the lossless ratio times the gain over lossless measured on
#: benchmarks/bench_cache.py's synthetic R50-shaped maps of one 800x1066 image (bitround-7: x1.20 on every
#: kind; bitround-4: C1 x1.54, others x1.57; quantize-1: C1 x2.04, others x1.75); rerun the benchmark
#: with a real detector to refine them.
ASSUMED_RATIOS: dict[str, dict[str, float]] = {
    "lossless": {"c1": 1.55, "enc": 1.07, "queries": 1.07, "other": 1.0},
    "bitround-7": {"c1": 1.87, "enc": 1.29, "queries": 1.29, "other": 1.0},
    "bitround-4": {"c1": 2.39, "enc": 1.68, "queries": 1.68, "other": 1.0},
    "quantize-1": {"c1": 3.17, "enc": 1.88, "queries": 1.87, "other": 1.0},
}
C1_MODES = ("store", "recompute")


@dataclass(frozen=True)
class SizeRow:
    """One line of the size table."""

    preset: str
    c1_mode: str
    bytes_per_image: float
    total_bytes: float


def raw_bytes(manifest: dict[str, Any], input_hws: Iterable[tuple[int, int]]) -> dict[str, float]:
    """Summed raw bytes of the valid region per array kind over images of network-input size ``(h, w)``."""
    d, k, c, c1 = manifest["hidden_dim"], manifest["topk"], manifest["num_classes"], manifest["c1_channels"]
    n_layers = len(manifest["enc_layers"])
    logit_size = 2 if manifest["dtypes"]["logits"] == "float16" else 4
    out = {"enc": 0.0, "c1": 0.0, "queries": 0.0, "other": 0.0}
    for ih, iw in input_hws:
        out["enc"] += 2 * d * n_layers * sum(math.ceil(ih / s) * math.ceil(iw / s) for s in manifest["level_strides"])
        out["c1"] += 2 * c1 * math.ceil(ih / 4) * math.ceil(iw / 4)
        out["queries"] += 2 * k * d
        out["other"] += k * (4 * 4 + logit_size * c) + 64
    return out


def numcodecs_chain(preset: CodecPreset, data_codec: dict[str, Any]) -> list[Any]:
    chain = [
        numcodecs.get_codec({"id": f["name"].removeprefix("numcodecs."), **f.get("configuration", {})})
        for f in preset.filter_metadata()
    ]
    if data_codec["name"] == "zstd":
        chain.append(numcodecs.Zstd(level=int(data_codec.get("level", 1))))
    elif data_codec["name"] == "blosc":
        chain.append(
            numcodecs.Blosc(
                cname=data_codec.get("cname", "zstd"),
                clevel=int(data_codec.get("level", 1)),
                shuffle=numcodecs.Blosc.SHUFFLE,
            )
        )
    return chain


def encoded_size(x: np.ndarray, chain: list[Any]) -> int:
    """Bytes of ``x`` after the numcodecs ``chain`` (in memory)."""
    buf: Any = np.ascontiguousarray(x)
    for codec in chain:
        buf = codec.encode(buf)
    return int(np.asarray(buf).nbytes) if isinstance(buf, np.ndarray) else len(buf)


def measure_ratios(store: Any, index: int) -> dict[str, dict[str, float]]:
    """Ratios (raw valid / encoded) of every preset on image ``index`` of a ``lossless`` store."""
    out, _ = store.read(index, crop=True)
    m = store.manifest
    kinds = {
        "queries": [out.queries[0].numpy()],
        "c1": [out.c1[0].numpy()],
        "enc": [out.enc_maps[e][lvl][0].numpy() for e in m["enc_layers"] for lvl in range(len(m["level_strides"]))],
    }
    ratios: dict[str, dict[str, float]] = {}
    for name, preset in PRESETS.items():
        chain = numcodecs_chain(preset, m["codecs"]["data"])
        ratios[name] = {"other": 1.0}
        for kind, arrays in kinds.items():
            raw = sum(a.nbytes for a in arrays)
            ratios[name][kind] = raw / max(sum(encoded_size(a, chain) for a in arrays), 1)
    return ratios


def ratios_for(store: Any | None) -> tuple[dict[str, dict[str, float]], str]:
    """Measured ratios from ``store`` where it holds a finished lossless image, else the assumed ones;
    and a note saying which."""
    if store is not None and preset_of(store.manifest).lossless:
        done = store.complete_indices()
        if len(done):
            i = int(done[0])
            return measure_ratios(store, i), (
                f"ratios measured by encoding image index {i} of this store with every preset in memory"
            )
    return ASSUMED_RATIOS, (
        "ratios assumed (mfdetr/cache/sizes.py ASSUMED_RATIOS; a dry run on a store with a "
        "finished lossless image measures them)"
    )


def size_table(raw: dict[str, float], n_images: int, ratios: dict[str, dict[str, float]]) -> list[SizeRow]:
    """One :class:`SizeRow` per preset and C1 mode for ``n_images`` images of summed ``raw`` bytes."""
    rows = []
    for preset in PRESETS:
        r = ratios[preset]
        for mode in C1_MODES:
            total = sum(raw[k] / r[k] for k in raw if not (mode == "recompute" and k == "c1"))
            rows.append(SizeRow(preset, mode, total / max(n_images, 1), total))
    return rows


def format_size_table(rows: list[SizeRow], *, chosen: tuple[str, str], note: str, n_images: int) -> list[str]:
    """The dry run's lines: one per preset and C1 mode, the chosen one marked ``*``."""
    from mfdetr.cache.chunk_files import human_bytes

    lines = [
        f"size per codec preset and C1 mode ({note}):",
        f"  {'codec':12s} {'C1':10s} {'bytes/image':>12s} {'split total (' + str(n_images) + ' images)':>26s}",
    ]
    for row in rows:
        mark = "*" if (row.preset, row.c1_mode) == chosen else " "
        lines.append(
            f"{mark} {row.preset:12s} {row.c1_mode:10s} {human_bytes(row.bytes_per_image):>12s} "
            f"{human_bytes(row.total_bytes):>26s}"
        )
    return lines


__all__ = [
    "ASSUMED_RATIOS",
    "C1_MODES",
    "SizeRow",
    "encoded_size",
    "format_size_table",
    "measure_ratios",
    "ratios_for",
    "raw_bytes",
    "size_table",
]
