"""Stage 2 engine: train / evaluate / sweep MaskNet on cached (or online) detector outputs.

The engine composes injected parts (model, criterion, dataset, evaluation) and owns the loop, data
order, distributed setup, checkpoints, logging and the run record. Public surface:

- :func:`train`, :class:`TrainResult`, :func:`seed_everything` — the training loop (:mod:`.trainer`);
- :class:`TrainConfig`, :class:`DataConfig`, :class:`RunConfig`, :func:`load_run_config`,
  :func:`build_run_config` — typed run configuration (:mod:`.config`);
- :class:`StepDecay` — the paper's lr schedule; :class:`EpochPlan` — seeded, resumable data order;
- :func:`collate_detector_outputs`, :func:`cat_detector_outputs`, :class:`Stage2Batch` — padding collate;
- :class:`EventFileWriter`, :func:`read_scalars` — TensorBoard scalars without tensorboard;
- :class:`MetricLogger`, :func:`read_jsonl` — run metrics;
- :func:`load_checkpoint`, :func:`check_masknet_config` — checkpoints;
- :class:`DistContext`, :func:`init_distributed` — torchrun support.
"""

from mfdetr.engine.checkpoint import check_masknet_config, library_versions, load_checkpoint, seed_step, step_seed
from mfdetr.engine.collate import Stage2Batch, cat_detector_outputs, collate_detector_outputs
from mfdetr.engine.config import DataConfig, RunConfig, TrainConfig, build_run_config, diff_configs, load_run_config
from mfdetr.engine.distributed import DistContext, init_distributed
from mfdetr.engine.metrics import MetricLogger, read_jsonl
from mfdetr.engine.sampling import EpochPlan
from mfdetr.engine.schedule import StepDecay
from mfdetr.engine.tfevents import EventFileWriter, read_scalars
from mfdetr.engine.trainer import TrainResult, seed_everything, train

__all__ = [
    "DataConfig", "DistContext", "EpochPlan", "EventFileWriter", "MetricLogger", "RunConfig", "Stage2Batch",
    "StepDecay", "TrainConfig", "TrainResult", "build_run_config", "cat_detector_outputs", "check_masknet_config",
    "collate_detector_outputs", "diff_configs", "init_distributed", "library_versions", "load_checkpoint",
    "load_run_config", "read_jsonl", "read_scalars", "seed_everything", "seed_step", "step_seed", "train",
]
