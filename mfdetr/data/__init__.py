"""COCO reading, the DETR-family eval preprocessing, batching, and the synthetic COCO-format dataset.

Ground floor: imports only :mod:`mfdetr.contracts` and :mod:`mfdetr.errors`.

- :class:`CocoInstances` — a COCO folder split as preprocessed images + :class:`~mfdetr.contracts.GTInstances`.
- :class:`EvalTransform`, :func:`resized_hw` — resize (shorter side S, longer ≤ M) + normalise.
- :func:`collate` → :class:`~mfdetr.contracts.ImageBatch`; :class:`SkipSafe`, :func:`collate_with_skips`,
  :func:`iterate_batches`, :class:`SkipRecord` — runs over a split that record bad images.
- :func:`load_rgb`, :func:`to_rgb` — any image file/mode → 8-bit RGB.
- :func:`mask_to_rle`, :func:`segmentation_to_rle`, :func:`decode_rle`, :func:`masks_to_boxes_xyxy`.
"""

from mfdetr.data.coco import CocoInstances, CocoItem, load_annotation_file
from mfdetr.data.collate import SkipRecord, SkipSafe, collate, collate_with_skips, iterate_batches
from mfdetr.data.images import load_rgb, to_rgb
from mfdetr.data.masks import decode_rle, decode_rles, mask_to_rle, masks_to_boxes_xyxy, segmentation_to_rle
from mfdetr.data.transforms import EvalTransform, resized_hw

__all__ = [
    "CocoInstances", "CocoItem", "EvalTransform", "SkipRecord", "SkipSafe", "collate", "collate_with_skips",
    "decode_rle", "decode_rles", "iterate_batches", "load_annotation_file", "load_rgb", "mask_to_rle", "masks_to_boxes_xyxy",
    "resized_hw", "segmentation_to_rle", "to_rgb",
]
