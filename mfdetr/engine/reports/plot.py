"""Render a run's training loss and evaluation AP curves to a PNG with matplotlib (Agg canvas).

Two panels side by side: left, the training loss (and its components) against the step; right, the
evaluation metrics (AP, AP50, AP75, ...) against the step. Axes with "nice" ticks, a legend per panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mfdetr.engine.metrics import read_jsonl
from mfdetr.errors import MfdetrError
from mfdetr.outputs import atomic_write, check_output_file

#: matplotlib's default "tab10" colours, in its order
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
Series = Mapping[str, Sequence[tuple[float, float]]]


def nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5, 5 × 10^k steps; integers only for ``integer``) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    mults = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in mults if m * mag >= raw)
    if integer:
        step = max(step, 1.0)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks


def draw_panel(ax: Axes, series: Series, *, title: str, xlabel: str, ylabel: str) -> None:
    """Draw one line chart of ``series`` (name → [(x, y)]) on ``ax``, with nice ticks and a legend."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not pts:
        ax.text(0.5, 0.5, "no data", color="gray", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs), integer=True), nice_ticks(min(ys), max(ys))
    ax.set_xticks(xt)
    ax.set_yticks(yt)
    ax.set_xlim(xt[0], xt[-1])
    ax.set_ylim(yt[0], yt[-1])
    ax.grid(True, color="0.9")
    for i, (name, s) in enumerate(series.items()):
        line = [(x, y) for x, y in s if math.isfinite(y)]
        ax.plot(
            [x for x, _ in line],
            [y for _, y in line],
            color=PALETTE[i % len(PALETTE)],
            linewidth=2,
            marker="o" if len(line) <= 30 else None,
            markersize=5,
            label=name,
        )
    ax.legend(loc="best", fontsize="small")


def run_series(
    run_dir: str | Path,
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
    """(loss series, eval series) from ``<run>/metrics.jsonl``."""
    recs = read_jsonl(Path(run_dir) / "metrics.jsonl")
    loss: dict[str, list[tuple[float, float]]] = {}
    ev: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        train = r.get("kind") == "train"
        target = loss if train else ev
        for k, v in r.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or k == "step":
                continue
            # the loss panel shows losses only; the AP panel the headline COCO numbers
            if (train and not (k == "loss" or k.startswith("loss_"))) or (
                not train and k not in ("AP", "AP50", "AP75", "box_AP")
            ):
                continue
            target.setdefault(k, []).append((float(r["step"]), float(v)))
    return loss, ev


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, size: tuple[int, int] = (1200, 480)) -> Path:
    """Write ``<run>/curves.png`` (or ``out``): loss (left) and AP (right) against the step."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise MfdetrError("not a training run folder (no metrics.jsonl)", path=run_dir)
    out_path = check_output_file(out if out is not None else run_dir / "curves.png")
    if out_path.suffix.lower() != ".png":
        raise MfdetrError("--out must name a .png file", path=out_path)
    loss, ev = run_series(run_dir)
    # keep the legend readable: the total first, at most 5 components
    ordered = dict(sorted(loss.items(), key=lambda kv: (kv[0] != "loss", kv[0]))[:6])
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)  # no pyplot: no global figure state
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    draw_panel(left, ordered, title=f"{run_dir.name}: training loss", xlabel="step", ylabel="loss")
    draw_panel(right, ev, title="evaluation", xlabel="step", ylabel="AP")
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=dpi), what="plot")  # never a half-written PNG
    return out_path
