"""The extension point shared by every DETR family (DINO, H-Deformable-DETR).

A family reuses: backbones (:mod:`mfdetr.detectors.backbones`), multi-scale inputs
(:mod:`.multiscale`), positional encodings (:mod:`.position`), deformable encoder/decoder layers
(:mod:`.deformable`), two-stage proposals (:mod:`.proposals`), the :class:`FrozenDetr` base that turns
its :class:`DetrForward` into :class:`~mfdetr.contracts.DetectorOutput` and box-AP detections, and the
strict checkpoint loader with a per-format :class:`CheckpointFormat` rename table. It only writes its
own transformer glue, its config dataclass and its presets.
"""

from mfdetr.detectors.common.checkpoint import (
    CheckpointFormat,
    load_checkpoint,
    load_state_dict_strict,
    read_checkpoint,
    remap_state_dict,
    unwrap_state_dict,
)
from mfdetr.detectors.common.deformable import (
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    encoder_reference_points,
    valid_ratios,
)
from mfdetr.detectors.common.frozen import DetrForward, FrozenDetr
from mfdetr.detectors.common.layers import MLP, clones
from mfdetr.detectors.common.multiscale import FlatLevels, build_input_proj, flatten_levels, project_levels
from mfdetr.detectors.common.position import PositionEmbeddingSine, sine_embed_coords
from mfdetr.detectors.common.postprocess import Detections, postprocess_detections
from mfdetr.detectors.common.proposals import gen_encoder_output_proposals

__all__ = [
    "MLP", "CheckpointFormat", "DeformableDecoderLayer", "DeformableEncoder", "DeformableEncoderLayer", "Detections",
    "DetrForward", "FlatLevels", "FrozenDetr", "PositionEmbeddingSine", "build_input_proj", "clones",
    "encoder_reference_points", "flatten_levels", "gen_encoder_output_proposals", "load_checkpoint",
    "load_state_dict_strict", "postprocess_detections", "project_levels", "read_checkpoint", "remap_state_dict",
    "sine_embed_coords", "unwrap_state_dict", "valid_ratios",
]
