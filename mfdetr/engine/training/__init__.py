"""The training engine: one short loop plus hooks, used by every training job of mfdetr.

- :class:`Trainer` — the loop (:mod:`.loop`); :class:`TrainModel` and :class:`TrainData` — what it trains
  and what feeds it (typed protocols); :class:`HookBase` — the hook interface.
- :mod:`.hooks` — :class:`LRSchedule`, :class:`StepSeed`, :class:`MetricsLog`, :class:`Progress`,
  :class:`Checkpointer` (+ :func:`restore` for resuming), :class:`Evaluation`.
- :mod:`.models` — the stage-2 models (:class:`Supervised`, :class:`FineTunedModel`);
  :mod:`.batches` — stage-2 batches from a dataset (:class:`LoaderData`).

The jobs compose them: stage 2 cached / online / fine-tuning (:mod:`mfdetr.engine.trainer`) and the
training of a detector from scratch (:mod:`mfdetr.engine.detector_training`).
"""

from mfdetr.engine.training.hooks import Checkpointer, Evaluation, LRSchedule, MetricsLog, Progress, StepSeed, restore
from mfdetr.engine.training.loop import AmpSettings, HookBase, StepRecord, TrainData, Trainer, TrainModel

__all__ = [
    "AmpSettings",
    "Checkpointer",
    "Evaluation",
    "HookBase",
    "LRSchedule",
    "MetricsLog",
    "Progress",
    "StepRecord",
    "StepSeed",
    "TrainData",
    "TrainModel",
    "Trainer",
    "restore",
]
