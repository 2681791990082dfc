"""The plan of a stage-1 job (``mfdetr cache``): what it was asked (:class:`CacheJob`), which shard of the
split this process writes, the manifest of the store, the images still to compute, the bytes they
will take, and the damaged images a rerun recomputes. No detector is built here; only :func:`plan_job`
looks the detector preset up in the registry."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mfdetr.cache.codecs import DEFAULT_PRESET, get_preset as get_codec_preset
from mfdetr.cache.manifest import build_manifest, sha256_file
from mfdetr.cache.sizes import ratios_for, raw_bytes, size_table
from mfdetr.cache.chunk_files import chunk_path
from mfdetr.cache.views import ORIG, parse_views, store_views, view_array_name
from mfdetr.cache.writer import COMMIT_DONE, COMMIT_PENDING, COMMIT_SKIPPED
from mfdetr.data import CocoInstances, resized_hw
from mfdetr.errors import MfdetrError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class CacheJob:
    """Everything ``mfdetr cache`` was asked to do (see the CLI for the meaning of each option)."""

    detector: str
    checkpoint: Path
    coco: Path
    split: str
    out: Path
    topk: int = 100
    enc_layers: tuple[int, ...] = (4,)
    batch_size: int = 1
    shard: tuple[int, int] | None = None
    device: str = "cpu"
    num_workers: int = 2
    writer_threads: int = 4
    retry_skipped: bool = False
    annotation_file: Path | None = None
    codec: str = DEFAULT_PRESET
    repair: bool = False
    c1: str = "store"  # "store" the C1 array, or "recompute" it in stage 2 from the stored stage 0
    views: tuple[str, ...] = (ORIG,)  # image views to store (mfdetr.cache.views): ("orig",) or ("orig", "hflip")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    if text is None or text == "":
        return None
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise MfdetrError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise MfdetrError(f"--shard {text}: need 0 <= i < n")
    return i, n


def resolve_shard(shard: tuple[int, int] | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Explicit ``--shard`` wins; else torchrun's ``RANK``/``WORLD_SIZE``; else ``(0, 1)``."""
    env = dict(os.environ) if env is None else env
    if shard is not None:
        return shard
    if "WORLD_SIZE" in env and "RANK" in env:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}") or (0, 1)
    return 0, 1


@dataclass
class _Plan:
    preset: Any
    dataset: CocoInstances
    manifest: dict[str, Any]
    image_ids: np.ndarray
    shard: tuple[int, int]


def plan_job(job: CacheJob) -> _Plan:
    """Resolve preset, dataset and manifest (no detector built, no store touched)."""
    from mfdetr.detectors.registry import get_preset, load_plugins

    get_codec_preset(job.codec)  # an unknown --codec fails before anything is read
    load_plugins()
    preset = get_preset(job.detector)
    if not Path(job.checkpoint).is_file():
        raise MfdetrError("checkpoint file not found", path=job.checkpoint)
    if job.batch_size < 1 or job.num_workers < 0 or job.writer_threads < 1:
        raise MfdetrError(
            f"need --batch-size >= 1, --workers >= 0 and --writer-threads >= 1, got "
            f"{job.batch_size}, {job.num_workers} and {job.writer_threads}"
        )
    if job.c1 not in ("store", "recompute"):
        raise MfdetrError(f"--c1 must be 'store' or 'recompute', got {job.c1!r}")
    dataset = CocoInstances(
        job.coco, job.split, preprocessing=preset.preprocessing, with_targets=False, annotation_file=job.annotation_file
    )
    image_ids = np.asarray(dataset.image_ids, dtype=np.int64)
    manifest = build_manifest(
        preset=preset,
        checkpoint_file=str(job.checkpoint),
        checkpoint_sha256=sha256_file(job.checkpoint),
        split=job.split,
        annotation_file=str(dataset.annotation_file),
        annotation_sha256=dataset.annotation_sha256,
        image_ids=image_ids.tolist(),
        topk=job.topk,
        enc_layers=job.enc_layers,
        codec_preset=job.codec,
        views=parse_views(job.views),
    )
    return _Plan(preset=preset, dataset=dataset, manifest=manifest, image_ids=image_ids, shard=resolve_shard(job.shard))


def estimate_bytes(
    plan: _Plan, indices: list[int], store: Any | None = None, *, c1_mode: str = "store"
) -> dict[str, Any]:
    """Estimated bytes of ``indices`` (with the job's codec and C1 mode) and a table of bytes/image and the
    whole split's total under every codec preset and C1 mode, from the annotation's image sizes and the
    shapes (:mod:`mfdetr.cache.sizes`; ratios measured on ``store`` where possible). Every stored view
    (:mod:`mfdetr.cache.views`) holds a full copy of an image's arrays: bytes scale with their number."""
    m = plan.manifest
    nv = len(store_views(m))
    pre = plan.preset.preprocessing
    d, k, c, c1 = m["hidden_dim"], m["topk"], m["num_classes"], m["c1_channels"]
    canvas = 2 * (
        d * len(m["enc_layers"]) * sum(h * w for h, w in m["canvas"]["level_hw"])
        + c1 * m["canvas"]["c1_hw"][0] * m["canvas"]["c1_hw"][1]
    ) + k * (2 * d + 4 * 4 + 4 * c)
    canvas *= nv
    hws = []
    for image_id in plan.image_ids.tolist():
        info = plan.dataset.image_info(int(image_id))
        hws.append(resized_hw(int(info["height"]), int(info["width"]), pre.short_side, pre.max_size))
    ratios, note = ratios_for(store)

    def raw_of(sizes: list[tuple[int, int]]) -> dict[str, float]:
        return {key: nv * v for key, v in raw_bytes(m, sizes).items()}

    raw = raw_of([hws[i] for i in indices])
    mine = next(
        r for r in size_table(raw, len(indices), ratios) if r.preset == m["codecs"]["preset"] and r.c1_mode == c1_mode
    )
    return {
        "images": len(indices),
        "bytes_per_image": mine.bytes_per_image,
        "raw_f16_valid_per_image": sum(raw.values()) / max(len(indices), 1),
        "raw_canvas_per_image": float(canvas),
        "total_bytes": mine.total_bytes,
        "ratios": ratios,
        "ratio_source": note,
        "table": size_table(raw_of(hws), len(hws), ratios),
    }


def _todo(plan: _Plan, commit: np.ndarray, retry_skipped: bool) -> list[int]:
    i, n = plan.shard
    mine = np.arange(i, len(plan.image_ids), n)
    pending = ~np.isin(commit[mine], (COMMIT_DONE, COMMIT_SKIPPED))  # pending, or a damaged commit flag
    if retry_skipped:
        pending |= commit[mine] == COMMIT_SKIPPED
    return mine[pending].tolist()


def reset_damaged(out_path: Path, root: Any, plan: _Plan, *, full: bool, echo: Callable[[str], None]) -> int:
    """Find this shard's damaged images and reset their commit flags to pending (so they are recomputed).

    Always: commit flags outside 0/1/2 and committed images with a missing or empty chunk file (one
    ``stat`` per array and image); with ``full`` (``--repair``) every committed image is also decoded
    (checksums, finite values). Returns how many were reset.
    """
    from mfdetr.cache.reader import CacheStore
    from mfdetr.cache.verify import find_damaged, image_arrays

    mine = range(plan.shard[0], len(plan.image_ids), plan.shard[1])
    written, found = 0, []
    for view in store_views(plan.manifest):  # every view of an image has its own commit flag
        store = CacheStore.open(out_path, view=view)
        written += int((store.commit_flags()[mine] != COMMIT_PENDING).sum())
        found_here = find_damaged(store, full=full, indices=mine)
        commit = root[view_array_name(view, "commit")]
        for d in found_here:
            echo(f"damaged {d.describe()}: recomputing it")
            commit[d.index] = COMMIT_PENDING
            for name in [*image_arrays(store.manifest), "skip_reason"]:  # zarr reads a shard it overwrites
                chunk_path(out_path, store._arrays[name], d.index).unlink(missing_ok=True)
        found += found_here
    if written:
        echo(
            f"{'repair (every committed image decoded)' if full else 'check of commit flags and chunk files'} of "
            f"{written} written image(s): {len(found)} damaged image(s) to recompute"
            + ("" if full else " (--repair also decodes every image)")
        )
    return len(found)


__all__ = ["CacheJob", "estimate_bytes", "parse_shard", "plan_job", "reset_damaged", "resolve_shard"]


def _stage0_module(detector: Any, name: str) -> nn.Module:
    """The frozen stage 0 (stem + first backbone stage) that produced the detector's C1."""
    fn = getattr(getattr(detector, "body", None), "stage0", None)
    if not callable(fn):
        raise MfdetrError(
            f"detector {name} does not expose its backbone's stage 0, so its C1 cannot be recomputed: use --c1 store"
        )
    return fn()


def recompute_manifest(plan: _Plan, detector: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A ``--c1 recompute`` store's manifest (no c1 array; the stage 0's sha256) and its stage-0 files
    (:mod:`mfdetr.cache.stage0`), exported from ``detector`` on a seeded random input (on the CPU)."""
    import torch

    from mfdetr.cache.schema import resolve_array_table
    from mfdetr.cache.stage0 import PROGRAM_FILE, WEIGHTS_FILE, export_stage0, sha256_bytes

    # traced and verified on the CPU (deterministic kernels), whatever device the detector runs on
    module = copy.deepcopy(_stage0_module(detector, plan.preset.name)).cpu()
    pre = plan.preset.preprocessing
    h = min(pre.short_side, 224)
    w = min(pre.max_size, h * 4 // 3 + 3)
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    program, weights = export_stage0(module, example)
    entry = {
        "mode": "recompute",
        "stage0": {
            "program": PROGRAM_FILE,
            "program_sha256": sha256_bytes(program),
            "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_bytes(weights),
        },
    }
    m = {**{k: v for k, v in plan.manifest.items() if k != "arrays"}, "c1": entry}
    m["arrays"] = [a.name for a in resolve_array_table(m)]
    return m, {PROGRAM_FILE: program, WEIGHTS_FILE: weights}
