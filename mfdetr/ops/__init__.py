"""Tensor ops shared by the detectors and the mask network (ground floor)."""

from mfdetr.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    clip_boxes,
    coco_bbox,
    generalized_box_iou,
    inverse_sigmoid,
    scale_boxes,
)
from mfdetr.ops.ms_deform_attn import (
    MSDeformAttn,
    SpatialShapes,
    level_shapes,
    ms_deform_attn,
    ms_deform_attn_reference,
    shapes_tensor,
)

__all__ = [
    "MSDeformAttn",
    "SpatialShapes",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "clip_boxes",
    "coco_bbox",
    "generalized_box_iou",
    "inverse_sigmoid",
    "level_shapes",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "scale_boxes",
    "shapes_tensor",
]
