"""Stage 2 engine: train / evaluate / sweep MaskNet on cached (or online) detector outputs.

The engine composes injected parts (model, criterion, dataset, evaluation) and owns the loop, data
order, distributed setup, checkpoints, logging and the run record. Public surface:

Subpackages by job: :mod:`.training` (the loop and its hooks, the detector's training driver),
:mod:`.inference` (``mfdetr predict``, overlays, ONNX export, latency, the SAM baseline) and
:mod:`.reports` (curves, the demo); the modules here serve stage 2 (train / evaluate / sweep, cached or
online).

- :class:`Trainer`, :class:`HookBase`, :class:`TrainModel` — the training loop and its hooks
  (:mod:`.training`), on which every training job runs (stage 2 cached / online / fine-tuning, and a
  detector from scratch: :mod:`.training.detector`);
- :func:`train`, :class:`TrainResult`, :func:`seed_everything` — stage-2 training (:mod:`.trainer`);
- :class:`TrainConfig`, :class:`DataConfig`, :class:`RunConfig`, :func:`load_run_config`,
  :func:`build_run_config` — typed run configuration (:mod:`.config`);
- :class:`StepDecay` — the paper's lr schedule; :class:`EpochPlan` — seeded, resumable data order;
- :func:`collate_detector_outputs`, :func:`cat_detector_outputs`, :class:`Stage2Batch` — padding collate;
- :class:`MetricLogger`, :func:`read_jsonl` — run metrics (JSONL and TensorBoard), :func:`read_scalars` —
  TensorBoard scalars read back; :func:`plot_run` — PNG curves;
- :func:`load_checkpoint`, :func:`check_masknet_config` — checkpoints;
- :class:`DistContext`, :func:`init_distributed` — torchrun support;
- :func:`load_sweep`, :func:`run_sweep` — ablation sweeps (:mod:`.sweep`);
- :class:`CacheDataset`, :func:`open_cache`, :func:`open_annotations` — the cache-backed dataset;
- :func:`train_from_cache`, :func:`eval_from_cache`, :func:`sweep_from_cache`, :class:`CacheSources` —
  what ``mfdetr train`` / ``eval`` / ``sweep`` call (:mod:`.stage2`);
- :func:`train_online`, :class:`DetectorStep`, :func:`eval_online`, :func:`sweep_online` — the same
  training / evaluation / sweeps with the detector in the loop; :class:`OnlineConfig` (large-scale
  jitter, fine-tuning) and :class:`FineTuned` (MaskNet + the partly unfrozen detector, Table 11).

Names are resolved lazily (PEP 562), so ``mfdetr plot`` does not pay for importing torch or zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mfdetr._lazy import lazy_exports

_EXPORTS = {
    "check_masknet_config": "checkpoint",
    "library_versions": "checkpoint",
    "load_checkpoint": "checkpoint",
    "seed_step": "checkpoint",
    "step_seed": "checkpoint",
    "Stage2Batch": "collate",
    "cat_detector_outputs": "collate",
    "collate_detector_outputs": "collate",
    "DataConfig": "config",
    "OnlineConfig": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "build_run_config": "config",
    "diff_configs": "config",
    "load_run_config": "config",
    "DistContext": "distributed",
    "init_distributed": "distributed",
    "MetricLogger": "metrics",
    "read_jsonl": "metrics",
    "read_scalars": "metrics",
    "plot_run": "reports.plot",
    "EpochPlan": "sampling",
    "StepDecay": "schedule",
    "TrainResult": "trainer",
    "seed_everything": "trainer",
    "train": "trainer",
    "SweepSpec": "sweep",
    "Variant": "sweep",
    "VariantResult": "sweep",
    "load_sweep": "sweep",
    "run_sweep": "sweep",
    "CacheDataset": "cache_data",
    "open_annotations": "cache_data",
    "open_cache": "cache_data",
    "CacheSources": "stage2",
    "eval_from_cache": "stage2",
    "sweep_from_cache": "stage2",
    "train_from_cache": "stage2",
    "DetectorStep": "online",
    "eval_online": "online",
    "sweep_online": "online",
    "train_online": "online",
    "FineTuned": "finetune",
    "HookBase": "training.loop",
    "TrainModel": "training.loop",
    "Trainer": "training.loop",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mfdetr.engine.cache_data import CacheDataset, open_annotations, open_cache
    from mfdetr.engine.checkpoint import check_masknet_config, library_versions, load_checkpoint, seed_step, step_seed
    from mfdetr.engine.collate import Stage2Batch, cat_detector_outputs, collate_detector_outputs
    from mfdetr.engine.config import (
        DataConfig,
        OnlineConfig,
        RunConfig,
        TrainConfig,
        build_run_config,
        diff_configs,
        load_run_config,
    )
    from mfdetr.engine.distributed import DistContext, init_distributed
    from mfdetr.engine.metrics import MetricLogger, read_jsonl, read_scalars
    from mfdetr.engine.finetune import FineTuned
    from mfdetr.engine.online import DetectorStep, eval_online, sweep_online, train_online
    from mfdetr.engine.reports.plot import plot_run
    from mfdetr.engine.sampling import EpochPlan
    from mfdetr.engine.schedule import StepDecay
    from mfdetr.engine.stage2 import CacheSources, eval_from_cache, sweep_from_cache, train_from_cache
    from mfdetr.engine.sweep import SweepSpec, Variant, VariantResult, load_sweep, run_sweep
    from mfdetr.engine.trainer import TrainResult, seed_everything, train
    from mfdetr.engine.training.loop import HookBase, Trainer, TrainModel


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
