"""Ablation sweeps: many MaskNet variants trained and evaluated from one cache, one comparison table.

A sweep file (``pipeline/ablations/<table>.toml``) holds values only::

    [sweep]
    table = "Table 2"                 # the paper table it reproduces
    title = "Effect of image feature encoder design"
    detector = "hdetr_r50"            # the detector the paper used (informational)
    columns = ["block type", "# layers"]
    train = true                      # false: training-free rows, evaluate only (Table 1)

    [base.train]                      # a full run config (sections as in pipeline/recipes/*.toml)
    [base.masknet]
    [base.loss]

    [[variants]]
    name = "deformable-2"
    labels = ["deformable", "2"]      # one value per column
    set = ["masknet.image_encoder.layers=2"]   # overrides on top of base (same syntax as the CLI)
    paper = { flops_g = 28.88, params_m = 1.51, AP = 32.9, AP50 = 60.0 }   # the paper's row

:func:`run_sweep` runs every variant through an injected ``run_variant`` (train + evaluate + count
complexity), skips variants whose ``result.json`` already exists (a sweep resumes), and writes
``summary.md`` and ``summary.csv`` with the paper's columns: #FLOPs▲, #params▲, AP, AP50, AP75, APs,
APm, APl (and the paper's AP beside ours).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfdetr.config import from_dict, load_toml
from mfdetr.engine.config import RunConfig, build_run_config
from mfdetr.errors import MfdetrError
from mfdetr.evaluation import METRIC_NAMES
from mfdetr.outputs import atomic_write_text

if TYPE_CHECKING:
    from mfdetr.masknet.config import MaskNetConfig
    from mfdetr.masknet.losses import LossConfig
    from mfdetr.masknet.targets import AssignConfig

METRICS = METRIC_NAMES  # the COCO summary numbers of every table row
BOUNDARY = "boundary_AP"  # Boundary AP of the masks (min of mask and boundary IoU), next to mask AP


@dataclass
class SweepInfo:
    """The ``[sweep]`` table."""

    table: str
    title: str
    columns: list[str]
    detector: str = ""
    train: bool = True
    notes: str = ""


@dataclass
class Variant:
    """One row of a sweep: overrides on top of the base config and the paper's numbers for it."""

    name: str
    labels: list[str]
    set: list[str] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    sweep: SweepInfo
    base: dict[str, Any]
    variants: list[Variant]
    path: str = ""

    def config_for(self, variant: Variant, overrides: Sequence[str] = ()) -> RunConfig:
        """The variant's full run config: base, then the variant's overrides, then the caller's."""
        return build_run_config(self.base, [*variant.set, *overrides], where=f"{self.path} [{variant.name}]")


@dataclass
class VariantResult:
    """What a variant produced (``metrics`` in percent, as the paper reports them)."""

    name: str
    labels: list[str]
    params_m: float | None = None
    flops_g: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (unknown keys, label counts, duplicate names, every variant's config)."""
    data = load_toml(path)
    unknown = sorted(set(data) - {"sweep", "base", "variants"})
    if unknown:
        raise MfdetrError(f"unknown top-level key(s) {', '.join(unknown)} (known: base, sweep, variants)", path=path)
    if "sweep" not in data or not isinstance(data.get("variants"), list) or not data["variants"]:
        raise MfdetrError("a sweep file needs a [sweep] table and [[variants]]", path=path)
    for i, row in enumerate(data["variants"]):
        if not isinstance(row, Mapping):
            raise MfdetrError(f"variants[{i}] is not a table", path=path)
    info = from_dict(SweepInfo, data["sweep"], where=f"{path} [sweep]")
    variants = [from_dict(Variant, v, where=f"{path} variants[{i}]") for i, v in enumerate(data["variants"])]
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MfdetrError(f"duplicate variant name(s): {', '.join(dup)}", path=path)
    for v in variants:
        if len(v.labels) != len(info.columns):
            raise MfdetrError(f"variant {v.name}: {len(v.labels)} labels for {len(info.columns)} columns", path=path)
        bad = sorted(set(v.paper) - {"flops_g", "params_m", *METRICS})
        if bad:
            raise MfdetrError(f"variant {v.name}: unknown paper field(s) {', '.join(bad)}", path=path)
    spec = SweepSpec(sweep=info, base=dict(data.get("base", {})), variants=variants, path=str(path))
    for v in variants:  # every variant's config is valid before anything runs
        typed_parts(spec.config_for(v), where=f"{path}: variant {v.name}")
    return spec


def typed_parts(cfg: RunConfig, *, where: str) -> tuple[MaskNetConfig, LossConfig, AssignConfig]:
    """``(MaskNetConfig, LossConfig, AssignConfig)`` of a run config's ``masknet``, ``loss`` and ``assign``
    tables (those stay plain data in :class:`RunConfig`): an unknown key or a wrong type in any of them is
    a one-line error naming ``where``."""
    from mfdetr.masknet.config import MaskNetConfig
    from mfdetr.masknet.losses import LossConfig
    from mfdetr.masknet.targets import AssignConfig

    return (
        from_dict(MaskNetConfig, cfg.masknet, where=f"{where}: masknet"),
        from_dict(LossConfig, cfg.loss, where=f"{where}: loss"),
        from_dict(AssignConfig, cfg.assign, where=f"{where}: assign"),
    )


def run_overrides(overrides: Sequence[str], default_section: str = "masknet") -> list[str]:
    """``section.key=value`` overrides where a key that names no run-config section (``train``, ``data``,
    ``online``, ``masknet``, ``loss``, ``assign``) belongs to ``default_section``: ``box_encoder.layers=3``
    is ``masknet.box_encoder.layers=3`` (how ``mfdetr describe`` takes its overrides)."""
    sections = {f.name for f in fields(RunConfig)}
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        out.append(item if "=" not in item or key.split(".", 1)[0] in sections else f"{default_section}.{item.strip()}")
    return out


def variant_masknet_config(spec: SweepSpec, variant: Variant, overrides: Sequence[str] = ()) -> MaskNetConfig:
    """The :class:`~mfdetr.masknet.config.MaskNetConfig` a variant trains: base, the variant's overrides of
    every section, then ``overrides`` (all applied to the full run config, as ``mfdetr sweep`` does)."""
    cfg = spec.config_for(variant, overrides)
    return typed_parts(cfg, where=f"{spec.path}: variant {variant.name}")[0]


RunVariant = Callable[[Variant, RunConfig, Path], VariantResult]
INPUTS_FILE = "inputs.json"


def _check_inputs(vdir: Path, inputs: Mapping[str, Any], name: str) -> None:
    """A finished variant is reused only if it ran on the same inputs (``inputs.json``: its config and
    the sweep's sources); settings that change no result (workers, progress, ...) may differ."""
    from mfdetr.engine.config import diff_configs
    from mfdetr.engine.trainer import RESUMABLE_CHANGES

    path = vdir / INPUTS_FILE
    if not path.is_file():
        return  # recorded before inputs were: reused as it is
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        raise MfdetrError("unreadable record of a finished variant's inputs", path=path) from None
    diff = [
        k
        for k in diff_configs(recorded, json.loads(json.dumps(inputs)))
        if k.removeprefix("config.") not in RESUMABLE_CHANGES
    ]
    if diff:
        raise MfdetrError(
            f"variant {name} was run with other inputs (differs in: {', '.join(diff[:6])}"
            f"{' ...' if len(diff) > 6 else ''}); choose another --out or remove {vdir}",
            path=vdir,
        )


def run_sweep(
    spec: SweepSpec,
    *,
    out_dir: str | Path,
    run_variant: RunVariant,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    log: Callable[[str], None] = print,
    sources: Mapping[str, Any] | None = None,
) -> list[VariantResult]:
    """Run every variant (or those named in ``only``) into ``out_dir/<name>/``; write the summary.

    A variant whose ``out_dir/<name>/result.json`` exists is not rerun: its stored result is used, if it
    ran on the same inputs — its config and ``sources`` (e.g. the caches' manifest hashes), recorded in
    ``out_dir/<name>/inputs.json`` — and refused otherwise.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(only) - {v.name for v in spec.variants})
    if unknown:
        raise MfdetrError(f"no variant named {', '.join(unknown)} in {spec.path}")
    results: list[VariantResult] = []
    for v in spec.variants:
        if only and v.name not in only:
            continue
        vdir = out / v.name
        done = vdir / "result.json"
        cfg = spec.config_for(v, overrides)
        inputs = {"config": cfg.to_dict(), "sources": dict(sources or {})}
        if done.is_file():
            _check_inputs(vdir, inputs, v.name)
            log(f"{v.name}: done before, reusing {done}")
            results.append(VariantResult(**json.loads(done.read_text())))
            continue
        vdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(vdir / INPUTS_FILE, json.dumps(inputs, indent=2) + "\n")
        log(f"{v.name}: {'training + ' if spec.sweep.train else ''}evaluating ({', '.join(v.set) or 'base'})")
        res = run_variant(v, cfg, vdir)
        res.paper = dict(v.paper)
        res.labels = list(v.labels)
        res.run_dir = str(vdir)
        atomic_write_text(done, json.dumps(asdict(res), indent=2) + "\n")
        results.append(res)
        write_summary(spec, results, out)
    write_summary(spec, results, out)
    return results


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None or math.isnan(v) else format(v, fmt)


def summary_rows(spec: SweepSpec, results: Sequence[VariantResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (ours, then the paper's AP)."""
    header = [*spec.sweep.columns, "#FLOPs▲", "#params▲", *METRICS, "AP^boundary", "paper AP", "paper #params▲"]
    rows = []
    for r in results:
        rows.append(
            [
                *r.labels,
                _num(r.flops_g, ".2f") + (" G" if r.flops_g is not None else ""),
                _num(r.params_m, ".2f") + (" M" if r.params_m is not None else ""),
                *[_num(r.metrics.get(m), ".1f") for m in (*METRICS, BOUNDARY)],
                _num(r.paper.get("AP"), ".1f"),
                _num(r.paper.get("params_m"), ".2f") + (" M" if "params_m" in r.paper else ""),
            ]
        )
    return header, rows


def write_summary(spec: SweepSpec, results: Sequence[VariantResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.md`` (a markdown table like the paper's) and ``summary.csv`` (numbers only)."""
    out = Path(out_dir)
    header, rows = summary_rows(spec, results)
    md = [
        f"# {spec.sweep.table}: {spec.sweep.title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [
        "",
        "▲: added by the mask network (the frozen detector is not counted), as in the paper; #FLOPs▲ are "
        "G multiply-adds of one forward pass for one 800×1200 image with K queries (torch's FLOP counter / 2); "
        "AP^boundary is the masks' Boundary AP (matching IoU = min(mask IoU, boundary IoU), band 2 % of the "
        "image diagonal).",
    ]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "name",
            *spec.sweep.columns,
            "flops_g",
            "params_m",
            *METRICS,
            BOUNDARY,
            *[f"paper_{k}" for k in ("flops_g", "params_m", *METRICS)],
        ]
    )
    for r in results:
        w.writerow(
            [
                r.name,
                *r.labels,
                r.flops_g,
                r.params_m,
                *[r.metrics.get(m) for m in (*METRICS, BOUNDARY)],
                *[r.paper.get(k) for k in ("flops_g", "params_m", *METRICS)],
            ]
        )
    atomic_write_text(out / "summary.csv", buf.getvalue())
    return out / "summary.md", out / "summary.csv"


def sweep_files(folder: str | Path) -> list[Path]:
    """The sweep files of a folder, sorted."""
    return sorted(Path(folder).glob("*.toml"))


def as_plain(results: Sequence[VariantResult]) -> list[Mapping[str, Any]]:
    return [asdict(r) for r in results]
