"""The Mask Frozen-DETR mask network (stage 2): reads only :class:`mfdetr.contracts.DetectorOutput`.

Never imports :mod:`mfdetr.detectors`: the mask network only ever sees tensors (an import-linter
contract in ``pyproject.toml`` checks it).

- architecture: :class:`MaskNetConfig` → :func:`build_masknet` → :class:`MaskNet` →
  :class:`MaskNetOutput`; :func:`baseline_config` (training-free eq. 1-4); :func:`load_masknet_config`;
- complexity: :func:`describe` / :func:`params_by_component` / :func:`flops_by_component` for a
  :class:`FeatureSpec` (``mfdetr describe``);
- training and output: :class:`MaskCriterion` (+ :class:`AssignConfig`, :class:`LossConfig`),
  :class:`PositivesOnly` (assignment first, then MaskNet on the positives only),
  :func:`paste_masks`, :func:`masks_to_coco_results`, :func:`encode_rle`.
"""

from mfdetr.masknet.complexity import FeatureSpec, describe, flops_by_component, params_by_component
from mfdetr.masknet.config import (
    BoxEncoderConfig,
    ImageEncoderConfig,
    MaskHeadConfig,
    MaskNetConfig,
    MaskScoringConfig,
    NeckConfig,
    QueryEncoderConfig,
    baseline_config,
    load_masknet_config,
)
from mfdetr.masknet.criterion import AssignConfig, LossConfig, MaskCriterion
from mfdetr.masknet.model import MaskNet, MaskNetOutput, build_masknet
from mfdetr.masknet.positives import PositivesOnly
from mfdetr.masknet.postprocess import ScoreMode, encode_rle, masks_to_coco_results, paste_masks

__all__ = [
    "AssignConfig",
    "BoxEncoderConfig",
    "FeatureSpec",
    "ImageEncoderConfig",
    "LossConfig",
    "MaskCriterion",
    "MaskHeadConfig",
    "MaskNet",
    "MaskNetConfig",
    "MaskNetOutput",
    "MaskScoringConfig",
    "NeckConfig",
    "PositivesOnly",
    "QueryEncoderConfig",
    "ScoreMode",
    "baseline_config",
    "build_masknet",
    "describe",
    "encode_rle",
    "flops_by_component",
    "load_masknet_config",
    "masks_to_coco_results",
    "params_by_component",
    "paste_masks",
]
