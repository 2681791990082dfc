"""Run metrics: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars (``tb/``).

Records are ``{"kind": "train"|"eval", "step": int, ...scalars}``. A resumed run first drops every
record past the checkpoint it resumes from (the killed process may have logged a few more steps), so
the file of a resumed run reads exactly like the file of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfdetr.outputs import atomic_write_text


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a kill is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """All ``(step, tag, value)`` scalars of one TensorBoard event file (or a folder of them), per tag
    in step order, read with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    return [(int(e.step), tag, float(e.value)) for tag in acc.Tags()[SCALARS] for e in acc.Scalars(tag)]


class MetricLogger:
    """Appends records to ``<run>/metrics.jsonl`` (or ``name``) and scalars to ``<run>/tb/``.

    Args:
        run_dir: the run folder.
        resume_step: when resuming, records with ``step`` beyond it are dropped first.
        tensorboard: also write TensorBoard event files.
        name: the file name of the records.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        name: str = "metrics.jsonl",
    ) -> None:
        self.path = Path(run_dir) / name
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard:  # imported here: reading metrics (``mfdetr plot``) never pays for tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, kind: str, step: int, scalars: Mapping[str, float], **extra: Any) -> None:
        rec: dict[str, Any] = {"kind": kind, "step": int(step), **extra}
        rec.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in scalars.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{kind}/{k}", float(v), global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
