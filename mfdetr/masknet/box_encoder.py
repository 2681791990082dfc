"""Box feature encoder F_b (sec. 3.3, eq. 9, Tables 3-4) on the RoI features R_i.

A channel mapper (Linear d → D, applied to F before RoIAlign as the paper describes: "decrease the
channel dimension of F") then a stack of blocks over each S×S RoI map, all B·K RoIs in one batch, of
a registered block kind (:mod:`mfdetr.masknet.blocks`): ``deformable`` (single-level layers over the
RoI map with a learned S×S×D positional embedding), ``swin`` (window ``min(w, S)``) or ``convnext``.

Per-layer #params at D: deformable (1 level, 8 heads, 4 points, FFN 4D) 682,848 at 256 and 177,632
at 128; Swin (w = 8) 791,560 at 256; ConvNeXt 539,136 at 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from mfdetr.masknet.blocks import BlockArgs, get_block, masked_fill_outside
from mfdetr.ops import box_cxcywh_to_xyxy

FEATURE_STRIDE = 4  # F lives on C1's stride-4 grid


class BoxEncoder(nn.Module):
    """Channel mapper + RoIAlign (eq. 3) + F_b (eq. 9), for all B·K boxes in one batch.

    Args:
        block: a registered block kind (:func:`mfdetr.masknet.blocks.block_names`).
        mapper: Linear d → D applied to F's channels, or ``None`` (D = d).
        layers: the stacked blocks at width D (already built; may be empty).
        pos_embed: the kind's learned embedding ([S·S, D] RoI positions of ``deformable``), or ``None``.
        roi_size: S.
        sampling_ratio: RoIAlign sampling points per bin side (0 = adaptive).
        checkpoint_tokens: activation checkpointing chunk (0 = off; see ``MaskNetConfig``).
    """

    def __init__(
        self,
        *,
        block: str,
        mapper: nn.Linear | None,
        layers: list[nn.Module],
        pos_embed: nn.Parameter | None,
        roi_size: int,
        sampling_ratio: int = 2,
        checkpoint_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.checkpoint_tokens = checkpoint_tokens
        self.sampling_ratio = sampling_ratio
        self.block = block
        self.kind = get_block(block)
        self.mapper = mapper
        self.layers = nn.ModuleList(layers)
        self.pos_embed = pos_embed
        self.roi_size = roi_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def map_channels(self, f: Tensor) -> Tensor:
        """The channel mapper on F [B, d, H, W] → [B, D, H, W] (identity when absent)."""
        if self.mapper is None:
            return f
        return self.mapper(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(
        self,
        f: Tensor,
        boxes: Tensor,
        input_hw: Tensor,
        valid_hw: Tensor,
        batch_idx: Tensor | None = None,
        *,
        mapped: bool = False,
    ) -> Tensor:
        """R_i for every box.

        Args:
            f: F [B, d, H1, W1] on the stride-4 grid, zero outside ``valid_hw`` [B, 2]; with ``mapped``
                the channel mapper's output [B, D, H1, W1] (zero outside) instead.
            boxes: [B, K, 4] normalised cxcywh of the unpadded input image ``input_hw`` [B, 2]; or, with
                ``batch_idx`` [N] (the image of each box), [N, 4].

        Returns:
            [B·K (or N), S·S, D] tokens R_i (row-major S×S grid over each box).
        """
        if not mapped:
            f = masked_fill_outside(self.map_channels(f), valid_hw)  # the mapper's bias must not leak into padding
        return self.encode(self.roi_align(f, boxes, input_hw, batch_idx))

    def roi_align(self, f: Tensor, boxes: Tensor, input_hw: Tensor, batch_idx: Tensor | None = None) -> Tensor:
        """RoIAlign (aligned, stride 4) of F for every box: [B, K, 4] (or [N, 4] of images ``batch_idx``)
        normalised cxcywh → [B·K (or N), D, S, S]."""
        if batch_idx is None:
            bsz, k = boxes.shape[:2]
            batch_idx = torch.arange(bsz, device=boxes.device).repeat_interleave(k)
            boxes = boxes.reshape(-1, 4)
        batch_idx = batch_idx.to(boxes.device)
        scale = input_hw.to(boxes.device)[batch_idx].flip(-1).repeat(1, 2).to(boxes.dtype)  # (w, h, w, h)
        xyxy = box_cxcywh_to_xyxy(boxes) * scale  # input pixels
        rois = torch.cat((batch_idx.to(boxes.dtype)[:, None], xyxy), 1)
        # a zero border: the canvas edge reads like padding, so RoIs at the image border do not depend
        # on whether the canvas carries padding there (RoIAlign clamps at the canvas edge)
        f = F.pad(f, (0, 1, 0, 1))
        dt = f.dtype
        if dt == torch.bfloat16:
            f = f.float()
        out = roi_align(
            f,
            rois.to(f.dtype),
            self.roi_size,
            spatial_scale=1.0 / FEATURE_STRIDE,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )
        return out.to(dt)

    def encode(self, rois: Tensor) -> Tensor:
        """F_b on ``rois`` [N, D, S, S] RoIAligned (mapped) features of all N = B·K boxes → [N, S·S, D]."""
        if not self.layers:
            return rois.flatten(2).transpose(1, 2)
        kw = {"checkpoint_tokens": self.checkpoint_tokens} if self.checkpoint_tokens else {}  # optional keyword
        return self.kind.encode_rois(self.layers, rois, self.pos_embed, **kw)


def build_box_encoder(
    *,
    block: str,
    layers: int,
    in_dim: int,
    dim: int | None,
    roi_size: int,
    heads: int = 8,
    points: int = 4,
    ffn_ratio: float = 4.0,
    swin_window: int = 8,
    convnext_kernel: int = 7,
    sampling_ratio: int = 2,
    checkpoint_tokens: int = 0,
) -> BoxEncoder:
    """Build the channel mapper (``in_dim`` = d → ``dim`` = D; none when D is None or d) and F_b."""
    d_out = in_dim if dim is None else dim
    mapper = nn.Linear(in_dim, d_out) if d_out != in_dim else None
    args = BlockArgs(
        dim=d_out,
        heads=heads,
        points=points,
        ffn_hidden=int(round(ffn_ratio * d_out)),
        window=swin_window,
        kernel=convnext_kernel,
    )
    mods, pos = get_block(block).build_box(layers, args, roi_size=roi_size)
    return BoxEncoder(
        block=block,
        mapper=mapper,
        layers=mods,
        pos_embed=pos,
        roi_size=roi_size,
        sampling_ratio=sampling_ratio,
        checkpoint_tokens=checkpoint_tokens,
    )


def roi_support(
    boxes: Tensor, batch_idx: Tensor, input_hw: Tensor, grid_hw: tuple[int, int], grid_stride: int, batch: int
) -> Tensor:
    """The cells of a feature grid that RoIAlign of ``boxes`` can read through F.

    F is the grid (stride ``grid_stride`` in input pixels, a multiple of 4) upsampled bilinearly
    (half-pixel centres) to stride 4; :meth:`BoxEncoder.roi_align` samples F bilinearly inside each
    box. A cell outside the returned mask reaches no sample of any box with a non-zero weight, so its
    value cannot change a RoI feature or its gradient.

    Args:
        boxes: [P, 4] normalised cxcywh of the unpadded input image of ``batch_idx`` [P].
        input_hw: [B, 2] unpadded input sizes; ``grid_hw``: (H, W) of the grid; ``batch``: B.

    Returns:
        [B, H, W] bool.
    """
    h, w = grid_hw
    dev = boxes.device
    bi = batch_idx.to(dev)
    scale = input_hw.to(dev)[bi].flip(-1).repeat(1, 2).to(torch.float64)  # (w, h, w, h)
    xyxy = box_cxcywh_to_xyxy(boxes.to(torch.float64)) * scale / FEATURE_STRIDE - 0.5  # F's pixel coordinates
    lo = torch.minimum(xyxy[:, :2], xyxy[:, 2:]).floor() - 1  # bilinear reads floor and floor + 1; one more
    hi = torch.maximum(xyxy[:, :2], xyxy[:, 2:]).floor() + 2  # cell either side for rounding
    r = grid_stride / FEATURE_STRIDE
    lo = ((lo + 0.5) / r - 0.5).floor() - 1  # the grid cells the upsampling reads for those F pixels
    hi = ((hi + 0.5) / r - 0.5).floor() + 2
    size = torch.tensor([w, h], device=dev, dtype=torch.float64)
    lo = torch.minimum(lo.clamp(min=0), size - 1).long()
    hi = torch.minimum(hi.clamp(min=0), size - 1).long() + 1  # exclusive
    # union of rectangles per image through a 2-D difference table
    table = torch.zeros(batch, h + 1, w + 1, dtype=torch.int32, device=dev)
    one = torch.ones_like(bi, dtype=torch.int32)
    for ys, xs, sign in (
        (lo[:, 1], lo[:, 0], 1),
        (lo[:, 1], hi[:, 0], -1),
        (hi[:, 1], lo[:, 0], -1),
        (hi[:, 1], hi[:, 0], 1),
    ):
        table.index_put_((bi, ys, xs), one * sign, accumulate=True)
    return table.cumsum(1).cumsum(2)[:, :h, :w] > 0
