"""COCO reading, the DETR-family eval preprocessing, batching, and the synthetic COCO-format dataset.

Ground floor: imports only :mod:`mfdetr.contracts` and :mod:`mfdetr.errors`.

- :class:`CocoInstances` — a COCO folder split as preprocessed images + :class:`~mfdetr.contracts.GTInstances`.
- :class:`EvalTransform`, :func:`resized_hw` — resize (shorter side S, longer ≤ M) + normalise.
- :func:`collate` → :class:`~mfdetr.contracts.ImageBatch`; :class:`SkipSafe`, :func:`collate_with_skips`,
  :func:`iterate_batches`, :class:`SkipRecord` — runs over a split that record bad images.
- :func:`load_rgb`, :func:`to_rgb` — any image file/mode → 8-bit RGB.
- :func:`load_annotations` / :func:`load_annotation_file`, :func:`annotation_path` — a COCO annotation JSON
  read once, validated, unusable annotations left out and reported (+ sha256).
- :func:`mask_to_rle`, :func:`segmentation_to_rle`, :func:`decode_rle`, :func:`masks_to_boxes_xyxy`,
  :func:`mask_to_polygons` — mask encodings.
- :class:`LargeScaleJitter` — large-scale jitter of a training split (online mode, paper Table 13).
- :func:`generate_synth`, :class:`SynthConfig`, :data:`SYNTH_CLASSES` — the synthetic dataset.

Names are resolved lazily (PEP 562) so that the torch-free tools (``mfdetr synth``, ``mfdetr
eval-json``) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mfdetr._lazy import lazy_exports

_EXPORTS = {
    "annotation_path": "annotations",
    "load_annotation_file": "annotations",
    "load_annotations": "annotations",
    "AnnotationFile": "annotations",
    "CocoInstances": "coco",
    "CocoItem": "coco",
    "SkipRecord": "batching",
    "SkipReplace": "batching",
    "SkipSafe": "batching",
    "collate": "batching",
    "collate_with_skips": "batching",
    "iterate_batches": "batching",
    "same_size_batches": "batching",
    "run_or_skip": "batching",
    "single_image_batches": "batching",
    "load_rgb": "images",
    "to_rgb": "images",
    "LargeScaleJitter": "lsj",
    "decode_rle": "masks",
    "decode_rles": "masks",
    "mask_to_rle": "masks",
    "masks_to_boxes_xyxy": "masks",
    "segmentation_to_rle": "masks",
    "mask_to_polygons": "polygons",
    "SynthConfig": "synth",
    "generate_synth": "synth",
    "SYNTH_CLASSES": "synth_render",
    "EvalTransform": "transforms",
    "resized_hw": "transforms",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mfdetr.data.annotations import AnnotationFile, annotation_path, load_annotation_file, load_annotations
    from mfdetr.data.coco import CocoInstances, CocoItem
    from mfdetr.data.batching import (
        SkipRecord,
        SkipReplace,
        SkipSafe,
        collate,
        collate_with_skips,
        iterate_batches,
        run_or_skip,
        same_size_batches,
        single_image_batches,
    )
    from mfdetr.data.images import load_rgb, to_rgb
    from mfdetr.data.lsj import LargeScaleJitter
    from mfdetr.data.masks import decode_rle, decode_rles, mask_to_rle, masks_to_boxes_xyxy, segmentation_to_rle
    from mfdetr.data.polygons import mask_to_polygons
    from mfdetr.data.synth import SynthConfig, generate_synth
    from mfdetr.data.synth_render import SYNTH_CLASSES
    from mfdetr.data.transforms import EvalTransform, resized_hw


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
