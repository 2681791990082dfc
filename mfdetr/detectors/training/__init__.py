"""Training a DINO preset from scratch (the shipped ``demo`` detector): DETR set-prediction losses.

- :class:`HungarianMatcher` — focal/L1/GIoU matching cost, optimal one-to-one assignment.
- :class:`SetCriterion`, :func:`sigmoid_focal_loss` — focal + L1 + GIoU on the final layer, every
  auxiliary decoder layer and the two-stage encoder proposals.
- :func:`dino_train_forward`, :func:`init_for_training` — the differentiable forward (all layers and
  the encoder proposals) from the frozen detector's submodules; DINO's head init (focal prior).
- :class:`DetectionTrainSet` — COCO split → padded batches with normalised boxes, seeded flips.
- :class:`DetTrainConfig`, :func:`build_trainable`, :func:`save_weights` — the recipe (config, trainable
  model, optimiser groups, shipped weights); :func:`box_ap`. The loop that trains it is the engine's
  (:func:`mfdetr.engine.training.detector.train_detector`).

Command line: ``python -m mfdetr.detectors.training {train,eval,export} ...`` (see ``--help``).
"""

from mfdetr.detectors.training.criterion import SetCriterion, sigmoid_focal_loss
from mfdetr.detectors.training.data import DetectionTrainSet, TrainBatch, epoch_batches, epoch_order
from mfdetr.detectors.training.evaluate import box_ap
from mfdetr.detectors.training.forward import (
    FOCAL_PRIOR,
    TrainForward,
    dino_train_forward,
    focal_prior_bias,
    init_for_training,
    trainable_model,
)
from mfdetr.detectors.training.recipe import (
    MAX_WEIGHTS_BYTES,
    DataOptions,
    DetTrainConfig,
    LossOptions,
    OptimOptions,
    build_trainable,
    save_weights,
    weights_state,
)
from mfdetr.detectors.training.matcher import HungarianMatcher

__all__ = [
    "FOCAL_PRIOR",
    "MAX_WEIGHTS_BYTES",
    "DataOptions",
    "DetTrainConfig",
    "DetectionTrainSet",
    "HungarianMatcher",
    "LossOptions",
    "OptimOptions",
    "SetCriterion",
    "TrainBatch",
    "TrainForward",
    "box_ap",
    "build_trainable",
    "dino_train_forward",
    "epoch_batches",
    "epoch_order",
    "focal_prior_bias",
    "init_for_training",
    "save_weights",
    "sigmoid_focal_loss",
    "trainable_model",
    "weights_state",
]
