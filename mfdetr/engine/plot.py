"""Render a run's training loss and evaluation AP curves to a PNG with Pillow (no matplotlib).

Two panels side by side: left, the training loss (and its components) against the step; right, the
evaluation metrics (AP, AP50, AP75, ...) against the step. Axes with "nice" ticks, a legend per panel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mfdetr.engine.metrics import read_jsonl
from mfdetr.errors import MfdetrError
from mfdetr.outputs import check_output_file

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
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


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: Series, *, title: str,
               xlabel: str, ylabel: str) -> None:
    """Draw one line chart of ``series`` (name → [(x, y)]) into ``box`` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    font, small = _font(16), _font(12)
    draw.text(((left + right) // 2, top + 4), title, fill="black", font=font, anchor="ma")
    pl, pt, pr, pb = left + 70, top + 34, right - 16, bottom - 48  # plot area
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    draw.rectangle([pl, pt, pr, pb], outline="black")
    if not pts:
        draw.text(((pl + pr) // 2, (pt + pb) // 2), "no data", fill="gray", font=font, anchor="mm")
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs), integer=True), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return pl + (x - x0) / (x1 - x0) * (pr - pl)

    def py(y: float) -> float:
        return pb - (y - y0) / (y1 - y0) * (pb - pt)

    for t in xt:
        x = px(t)
        draw.line([x, pt, x, pb], fill=(230, 230, 230))
        draw.line([x, pb, x, pb + 5], fill="black")
        draw.text((x, pb + 8), _fmt(t), fill="black", font=small, anchor="ma")
    for t in yt:
        y = py(t)
        draw.line([pl, y, pr, y], fill=(230, 230, 230))
        draw.line([pl - 5, y, pl, y], fill="black")
        draw.text((pl - 8, y), _fmt(t), fill="black", font=small, anchor="rm")
    draw.rectangle([pl, pt, pr, pb], outline="black")
    draw.text(((pl + pr) // 2, bottom - 6), xlabel, fill="black", font=small, anchor="md")
    draw.text((left + 4, (pt + pb) // 2), ylabel, fill="black", font=small, anchor="lm")
    for i, (name, s) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        line = [(px(x), py(y)) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=col, width=2)
        for x, y in line if len(line) <= 30 else line[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        ly = pt + 8 + 16 * i  # legend, top right
        draw.line([pr - 130, ly, pr - 110, ly], fill=col, width=3)
        draw.text((pr - 104, ly), name, fill="black", font=small, anchor="lm")


def run_series(run_dir: str | Path) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
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
            if (train and not (k == "loss" or k.startswith("loss_"))) or \
                    (not train and k not in ("AP", "AP50", "AP75", "box_AP")):
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
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    w, h = size
    draw_panel(draw, (0, 0, w // 2, h), ordered, title=f"{run_dir.name}: training loss", xlabel="step",
               ylabel="loss")
    draw_panel(draw, (w // 2, 0, w, h), ev, title="evaluation", xlabel="step", ylabel="AP")
    tmp = out_path.with_name(out_path.name + ".tmp")  # a half-written PNG never takes the name
    img.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return out_path
