"""The extension point shared by every DETR family (DINO, H-Deformable-DETR).

A family reuses: the :class:`DeformableDetr` skeleton (:mod:`.detr`: backbone → projections →
positions → its transformer → per-layer heads), the :class:`RefiningDecoder` (:mod:`.decoder`), the
two-stage :func:`select_proposals`, the :class:`DetrArchConfig` base and preset helpers (:mod:`.arch`),
the config-sized part builders (:mod:`.parts`),
backbones (:mod:`mfdetr.detectors.backbones`), multi-scale inputs
(:mod:`.multiscale`), deformable encoder/decoder stacks (:mod:`.deformable`; the encoder layer and the
positional encodings are the shared ones of :mod:`mfdetr.layers`), two-stage proposals (:mod:`.proposals`), the :class:`FrozenDetr` base that turns
its :class:`DetrForward` into :class:`~mfdetr.contracts.DetectorOutput` and box-AP detections, and the
strict checkpoint loader with a per-format :class:`CheckpointFormat` rename table. It only writes its
own transformer glue, its config dataclass and its presets.
"""

from mfdetr.detectors.common.arch import DetrArchConfig, family_preset, register_family
from mfdetr.detectors.common.checkpoint import (
    CheckpointFormat,
    load_checkpoint,
    load_state_dict_strict,
    read_checkpoint,
    remap_state_dict,
    unwrap_state_dict,
)
from mfdetr.detectors.common.decoder import RefiningDecoder, layer_predictions
from mfdetr.detectors.common.deformable import (
    DeformableDecoderLayer,
    DeformableEncoder,
    official_encoder_layer,
    valid_ratios,
)
from mfdetr.detectors.common.detr import DeformableDetr
from mfdetr.detectors.common.frozen import DetrForward, FrozenDetr
from mfdetr.detectors.common.layers import MLP, clones
from mfdetr.detectors.common.multiscale import FlatLevels, build_input_proj, flatten_levels, project_levels
from mfdetr.detectors.common.parts import build_decoder_layers, build_encoder, build_heads, build_level_proj
from mfdetr.detectors.common.postprocess import Detections, postprocess_detections
from mfdetr.detectors.common.proposals import gen_encoder_output_proposals, select_proposals

__all__ = [
    "MLP",
    "CheckpointFormat",
    "DeformableDecoderLayer",
    "DeformableDetr",
    "DeformableEncoder",
    "Detections",
    "DetrArchConfig",
    "DetrForward",
    "FlatLevels",
    "FrozenDetr",
    "RefiningDecoder",
    "build_decoder_layers",
    "build_encoder",
    "build_heads",
    "build_input_proj",
    "build_level_proj",
    "clones",
    "family_preset",
    "flatten_levels",
    "gen_encoder_output_proposals",
    "layer_predictions",
    "load_checkpoint",
    "load_state_dict_strict",
    "official_encoder_layer",
    "postprocess_detections",
    "project_levels",
    "read_checkpoint",
    "register_family",
    "remap_state_dict",
    "select_proposals",
    "unwrap_state_dict",
    "valid_ratios",
]
