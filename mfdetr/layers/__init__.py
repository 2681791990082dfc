"""Building blocks shared by the detectors and the mask network (the ground floor above ``mfdetr.ops``).

Each block exists once here; its callers differ only through parameters (activation, parameter
names, padding semantics), never through a copy. Imports only :mod:`mfdetr.ops`,
:mod:`mfdetr.contracts` and :mod:`mfdetr.errors` (an import-linter contract checks it).

- :mod:`.ffn` — the two-layer token MLP;
- :mod:`.deformable` — the post-norm multi-scale deformable encoder layer and its reference points;
- :mod:`.position` — sine positional embeddings (of padded maps, of valid sizes, of coordinates);
- :mod:`.windows` — Swin's window partition, relative position index / bias and shifted-window regions;
- :mod:`.matching` — the focal classification cost of DETR-style Hungarian matching.
"""

from mfdetr.layers.deformable import DeformableEncoderLayer, encoder_reference_points
from mfdetr.layers.ffn import FFN
from mfdetr.layers.matching import focal_class_cost
from mfdetr.layers.position import PositionEmbeddingSine, sine_embed_coords, sine_features, sine_pos_embed_from_sizes
from mfdetr.layers.windows import (
    relative_position_bias,
    relative_position_index,
    shifted_window_regions,
    window_partition,
    window_reverse,
)

__all__ = [
    "FFN",
    "DeformableEncoderLayer",
    "PositionEmbeddingSine",
    "encoder_reference_points",
    "focal_class_cost",
    "relative_position_bias",
    "relative_position_index",
    "shifted_window_regions",
    "sine_embed_coords",
    "sine_features",
    "sine_pos_embed_from_sizes",
    "window_partition",
    "window_reverse",
]
