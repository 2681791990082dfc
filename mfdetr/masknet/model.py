"""The Mask Frozen-DETR mask network (Fig. 7): ``MaskNet.forward(DetectorOutput) -> MaskNetOutput``.

Data flow for B images and K queries (all B·K RoIs batched together, no loop over queries):

1. take the top-K (score-sorted) queries, boxes, logits; the encoder maps of ``enc_layer``; C1;
   ZERO every map outside its valid region (``level_valid_hw``; ``ceil(input_hw / 4)`` for C1), so
   nothing depends on how much padding a batch or a cache canvas added;
2. image feature encoder on the encoder maps (eq. 5-8) → E_1 (highest resolution);
3. F = Neck(C1) + up(E_1) at stride 4 (eq. 1/5/14; ``fuse_c1 = False``: F = up(E_1));
4. non-RoI baseline (eq. 1): mask logits = q_i · F on the stride-4 image grid;
   RoI mode: channel mapper on F, RoIAlign per box to S×S (eq. 3), box feature encoder (eq. 9);
5. query feature encoder (eq. 10-11), mask head (eq. 4 / Table 14), mask scoring (eq. 12).

MaskNet imports nothing from ``mfdetr.detectors``; it reads only :class:`DetectorOutput` fields, so it
runs identically from the cache and online. Detector metadata (d, level strides, C1 channels) is
given to :func:`build_masknet` by the caller (the cache manifest or the detector preset).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mfdetr.contracts import DetectorOutput
from mfdetr.errors import MfdetrError
from mfdetr.masknet.blocks import masked_fill_outside
from mfdetr.masknet.box_encoder import BoxEncoder, build_box_encoder, roi_support
from mfdetr.masknet.config import MaskNetConfig, check_masknet_config
from mfdetr.masknet.image_encoder import ImageEncoder, build_image_encoder
from mfdetr.masknet.mask_head import DotProductHead, SegmenterHead
from mfdetr.masknet.mask_scoring import MaskScoringHead
from mfdetr.masknet.neck import Neck
from mfdetr.masknet.output import C1_STRIDE, MaskNetOutput
from mfdetr.masknet.query_encoder import QueryEncoder

__all__ = ["C1_STRIDE", "MaskNet", "MaskNetOutput", "build_masknet"]


class MaskNet(nn.Module):
    """The trainable mask network on top of a frozen DETR (all parts passed in, built by
    :func:`build_masknet`).

    Args:
        d_model: width d of the queries and encoder maps.
        level_strides: stride of each encoder level (highest resolution first; E_1's must be a
            multiple of 4).
        c1_channels: channels of C1.
        num_queries: K (top-K of the stored queries).
        enc_layer: which cached encoder layer (1-based).
        roi, roi_size, fuse_c1: see :class:`MaskNetConfig` (RoIAlign itself lives in the box encoder).
        neck, image_encoder, box_encoder, query_encoder, mask_head, mask_scoring: the parts
            (``None`` where absent).
    """

    def __init__(
        self,
        *,
        d_model: int,
        level_strides: Sequence[int],
        c1_channels: int,
        num_queries: int,
        enc_layer: int,
        roi: bool,
        roi_size: int,
        fuse_c1: bool,
        neck: Neck | None,
        image_encoder: ImageEncoder,
        box_encoder: BoxEncoder | None,
        query_encoder: QueryEncoder | None,
        mask_head: DotProductHead | SegmenterHead,
        mask_scoring: MaskScoringHead | None,
    ) -> None:
        super().__init__()
        self.d_model, self.level_strides, self.c1_channels = d_model, tuple(level_strides), c1_channels
        self.num_queries, self.enc_layer = num_queries, enc_layer
        self.roi, self.roi_size, self.fuse_c1 = roi, roi_size, fuse_c1
        self.neck = neck
        self.image_encoder = image_encoder
        self.box_encoder = box_encoder
        self.query_encoder = query_encoder
        self.mask_head = mask_head
        self.mask_scoring = mask_scoring

    #: fold linear maps into their neighbours (the same function, less work): the channel mapper, the
    #: neck and E_1's upsampling as one step, box-to-object attention's k/v projections into its query;
    #: :mod:`~mfdetr.masknet.complexity` turns it off to count each step as the paper does
    fold_linear_maps: bool = True

    # -- inputs --------------------------------------------------------------------------------
    def _check(self, det: DetectorOutput) -> list[Tensor]:
        if self.enc_layer not in det.enc_maps:
            raise MfdetrError(
                f"masknet.enc_layer={self.enc_layer} but the detector output holds encoder "
                f"layers {sorted(det.enc_maps)}"
            )
        maps = det.enc_maps[self.enc_layer]
        if det.queries.shape[-1] != self.d_model:
            raise MfdetrError(
                f"MaskNet was built for d={self.d_model}, the detector output has d={det.queries.shape[-1]}"
            )
        if len(maps) != len(self.level_strides):
            raise MfdetrError(
                f"MaskNet was built for {len(self.level_strides)} encoder levels, the detector output has {len(maps)}"
            )
        if det.c1.shape[1] != self.c1_channels:
            raise MfdetrError(
                f"MaskNet was built for C1 with {self.c1_channels} channels, the detector output has {det.c1.shape[1]}"
            )
        return maps

    def _dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return torch.float32 if p is None else p.dtype

    # -- forward -------------------------------------------------------------------------------
    @property
    def queries_interact(self) -> bool:
        """Whether one query's outputs depend on the other queries (object-to-object attention)."""
        return self.query_encoder is not None and self.query_encoder.o2o is not None

    def forward(self, det: DetectorOutput, select: tuple[Tensor, Tensor] | None = None) -> MaskNetOutput:
        """Mask logits (and predicted IoU) for the top-K queries of every image in ``det``.

        Args:
            det: the detector outputs of B images.
            select: ``(batch_idx, query_idx)`` [P] int64 (query indices < K): compute only these
                queries (training: the ones that get a loss). The image encoder, neck and F run once
                per image, the image encoder's last deformable layer only on the E_1 tokens RoIAlign
                reads for the selected boxes; the box feature encoder, query encoder, mask head and mask
                scoring run on the P selected queries only. Every selected query's outputs equal the
                all-K computation's, except where queries interact or share one map: with
                object-to-object attention, and in the non-RoI baseline (``roi=false``), all K are
                computed and the selected rows taken. An empty selection still runs the box branch on
                one query (its rows are dropped), so every parameter stays in the autograd graph.

        Returns:
            :class:`MaskNetOutput`, all K queries per image, or the P selected ones (``selected``).
        """
        maps = self._check(det)
        dtype = self._dtype()
        k = min(self.num_queries, det.num_queries)
        queries = det.queries[:, :k].to(dtype)
        boxes = det.boxes[:, :k].float()
        bsz, dev = queries.shape[0], queries.device
        input_hw = det.input_hw.to(dev)
        c1_hw = (input_hw + C1_STRIDE - 1) // C1_STRIDE
        if select is not None:
            select = self._check_select(select, bsz, k, dev)
        full = select is None or self.queries_interact or not self.roi
        bi, qi = self._rows(None if full else select, bsz, k, dev)
        needed = None
        if not full:  # the image encoder need only be exact where RoIAlign reads the selected boxes
            needed = roi_support(boxes[bi, qi], bi, input_hw, tuple(maps[0].shape[-2:]), self.level_strides[0], bsz)
        fold = self.roi and self.fold_linear_maps
        f = self._features(det, maps, dtype, c1_hw, needed, fold)  # folded: already mapped to D
        common = {
            "boxes": boxes,
            "scores": det.scores[:, :k],
            "logits": det.logits[:, :k],
            "input_hw": det.input_hw,
            "orig_hw": det.orig_hw,
            "mask_valid_hw": c1_hw.to(det.input_hw.device),
        }

        if not self.roi:  # eq. 1: dot product on the whole stride-4 grid
            ml = torch.einsum("bkc,bchw->bkhw", self.mask_head_project(queries), f)
            out = MaskNetOutput(mask_logits=ml, iou_pred=None, roi=False, **common)
            return out if select is None else out.select(*select)

        q_in = queries if full else queries[bi, qi][None]  # O2O attends within each image's K queries
        ml, iou = self._box_branch(f, q_in, boxes[bi, qi], bi, input_hw, c1_hw, fold)
        if full:
            s = self.roi_size
            out = MaskNetOutput(
                mask_logits=ml.view(bsz, k, s, s),
                iou_pred=None if iou is None else iou.view(bsz, k),
                roi=True,
                **common,
            )
            return out if select is None else out.select(*select)
        assert select is not None
        n = int(select[0].numel())
        return MaskNetOutput(
            mask_logits=ml[:n], iou_pred=None if iou is None else iou[:n], roi=True, selected=select, **common
        )

    @staticmethod
    def _rows(select: tuple[Tensor, Tensor] | None, bsz: int, k: int, dev: torch.device) -> tuple[Tensor, Tensor]:
        """The (image, query) of each box-branch row: all B·K queries, or the selected ones (an empty
        selection runs one query, so every parameter stays in the graph; its rows are dropped)."""
        if select is None:
            return torch.arange(bsz, device=dev).repeat_interleave(k), torch.arange(k, device=dev).repeat(bsz)
        bi, qi = select
        if bi.numel() == 0:
            bi = qi = torch.zeros(1, dtype=torch.long, device=dev)
        return bi, qi

    def _features(
        self,
        det: DetectorOutput,
        maps: list[Tensor],
        dtype: torch.dtype,
        c1_hw: Tensor,
        needed: Tensor | None,
        fold: bool = False,
    ) -> Tensor:
        """Steps 1-3: F [B, d, H1, W1] on the stride-4 grid, zero outside ``c1_hw`` (exact where RoIAlign
        reads when ``needed`` [B, H_1, W_1] marks the E_1 cells it reaches).

        With ``fold``: the box encoder's channel mapper applied to F ([B, D, H1, W1], zero outside). The
        mapper is linear, so it runs on E_1 before the upsampling and is folded into the neck
        (:meth:`Neck.mapped`): no d-channel map is built on the stride-4 grid."""
        level_hw = det.level_valid_hw.to(c1_hw.device)
        # 1. zero everything outside the valid regions (padding-invariance)
        maps = [masked_fill_outside(m.to(dtype), level_hw[:, lvl]) for lvl, m in enumerate(maps)]
        c1 = masked_fill_outside(det.c1.to(dtype), c1_hw)
        # 2. image feature encoder (eq. 5-8)
        e1 = self.image_encoder.first_level(maps, level_hw, needed)
        mapper = self.box_encoder.mapper if fold and self.box_encoder is not None else None
        weight = None if mapper is None else mapper.weight
        if weight is not None:
            e1 = F.conv2d(e1, weight[:, :, None, None])
        # 3. F = Neck(C1) + up(E_1) at stride 4 (eq. 1, 5, 14)
        f = self._upsample_to(e1, c1.shape[-2:])
        if self.fuse_c1:
            if self.neck is not None:
                f = f + self._neck(c1, c1_hw, weight, fold)
            else:
                f = f + (c1 if weight is None else F.conv2d(c1, weight[:, :, None, None]))
        if mapper is not None:
            f = f + mapper.bias[:, None, None]
        return masked_fill_outside(f, c1_hw)

    def _neck(self, c1: Tensor, c1_hw: Tensor, weight: Tensor | None, fold: bool) -> Tensor:
        """The neck on C1 (then ``weight``; folded into one map with ``fold``), recomputed in the backward
        pass under ``checkpoint_tokens``."""
        assert self.neck is not None
        fn, args = (self.neck.mapped, (c1, c1_hw, weight)) if fold else (self.neck, (c1, c1_hw))
        if self.image_encoder.checkpoint_tokens and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _box_branch(
        self,
        f: Tensor,
        queries: Tensor,
        boxes: Tensor,
        batch_idx: Tensor,
        input_hw: Tensor,
        c1_hw: Tensor,
        mapped: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Steps 4-5 on ``f`` (F, or mapper(F) when ``mapped``) for N = G·M queries (``queries`` [G, M, d]: groups of M queries that attend to each
        other with O2O; ``boxes`` [N, 4] of images ``batch_idx`` [N], in the queries' row-major order):
        mask logits [N, S, S] and predicted IoU [N] (or ``None``)."""
        assert self.box_encoder is not None
        # 4. channel mapper, RoIAlign (eq. 3), box feature encoder (eq. 9)
        tokens = self.box_encoder(f, boxes, input_hw, c1_hw, batch_idx=batch_idx, mapped=mapped)  # [N, S·S, D]
        # 5. query encoder (eq. 10-11), mask head (eq. 4), mask scoring (eq. 12)
        n, s = int(boxes.shape[0]), self.roi_size
        q = queries
        if self.query_encoder is not None:
            q = self.query_encoder(queries, tokens, fold=self.fold_linear_maps)
        ml = self.mask_head(q.reshape(n, -1), tokens).view(n, s, s)
        iou = None if self.mask_scoring is None else self.mask_scoring(ml, tokens).view(n)
        return ml, iou

    @staticmethod
    def _check_select(select: tuple[Tensor, Tensor], bsz: int, k: int, dev: torch.device) -> tuple[Tensor, Tensor]:
        bi, qi = (torch.as_tensor(t, device=dev).long() for t in select)
        if bi.dim() != 1 or bi.shape != qi.shape:
            raise ValueError(f"select must be two [P] index tensors, got {tuple(bi.shape)} and {tuple(qi.shape)}")
        if bi.numel() and not (0 <= int(bi.min()) and int(bi.max()) < bsz and 0 <= int(qi.min()) and int(qi.max()) < k):
            raise ValueError(f"select holds an index outside the batch ({bsz} images) or the top-{k} queries")
        return bi, qi

    def mask_head_project(self, queries: Tensor) -> Tensor:
        """Queries as the dot-product head sees them (identity at D = d)."""
        if isinstance(self.mask_head, DotProductHead):
            return self.mask_head.project(queries)
        raise MfdetrError("the non-RoI baseline supports only the dot-product mask head")

    def _upsample_to(self, e1: Tensor, hw: torch.Size | tuple[int, int]) -> Tensor:
        """E_1 [B, d, h, w] (zero outside its valid region) to the stride-4 canvas ``hw``.

        One zero row/column is appended before bilinear ×(stride/4) upsampling (half-pixel centres,
        fixed scale factor), so the values near the valid border are the same whether the canvas
        ends there or carries padding."""
        r = self.level_strides[0] // C1_STRIDE
        if r > 1:
            e1 = F.interpolate(F.pad(e1, (0, 1, 0, 1)), scale_factor=float(r), mode="bilinear", align_corners=False)
        h, w = hw[0], hw[1]  # sizes, symbolic under export
        e1 = e1[..., :h, :w]
        return F.pad(e1, (0, w - e1.shape[-1], 0, h - e1.shape[-2]))


def build_masknet(cfg: MaskNetConfig, *, d_model: int, level_strides: Sequence[int], c1_channels: int) -> MaskNet:
    """Build the mask network of ``cfg`` for a detector with width ``d_model``, encoder levels of
    ``level_strides`` (highest resolution first) and a C1 of ``c1_channels`` channels.

    Inconsistent choices are :class:`MfdetrError` naming the config keys (:func:`check_masknet_config`)."""
    strides = tuple(int(s) for s in level_strides)
    box_dim = check_masknet_config(cfg, d_model=d_model, level_strides=strides, c1_channels=c1_channels)
    ie, be = cfg.image_encoder, cfg.box_encoder
    try:
        neck = Neck(in_channels=c1_channels, dim=d_model, groups=cfg.neck.groups) if cfg.neck.enabled else None
    except ValueError as e:
        raise MfdetrError(f"masknet config: {e}") from None
    image_encoder = build_image_encoder(
        block=ie.block,
        layers=ie.layers,
        dim=d_model,
        levels=len(strides),
        heads=ie.heads,
        points=ie.points,
        ffn_ratio=ie.ffn_ratio,
        swin_window=ie.swin_window,
        convnext_kernel=ie.convnext_kernel,
        level_embed=ie.level_embed,
        checkpoint_tokens=cfg.checkpoint_tokens,
    )
    box_encoder = None
    if cfg.roi:
        box_encoder = build_box_encoder(
            block=be.block,
            layers=be.layers,
            in_dim=d_model,
            dim=box_dim,
            roi_size=cfg.roi_size,
            heads=be.heads,
            points=be.points,
            ffn_ratio=be.ffn_ratio,
            swin_window=be.swin_window,
            convnext_kernel=be.convnext_kernel,
            sampling_ratio=cfg.roi_sampling_ratio,
            checkpoint_tokens=cfg.checkpoint_tokens,
        )
    query_encoder, head, scoring = _query_side(cfg, d_model, box_dim)
    return MaskNet(
        d_model=d_model,
        level_strides=strides,
        c1_channels=c1_channels,
        num_queries=cfg.num_queries,
        enc_layer=cfg.enc_layer,
        roi=cfg.roi,
        roi_size=cfg.roi_size,
        fuse_c1=cfg.fuse_c1,
        neck=neck,
        image_encoder=image_encoder,
        box_encoder=box_encoder,
        query_encoder=query_encoder,
        mask_head=head,
        mask_scoring=scoring,
    )


def _query_side(
    cfg: MaskNetConfig, d_model: int, box_dim: int
) -> tuple[QueryEncoder | None, DotProductHead | SegmenterHead, MaskScoringHead | None]:
    """The query encoder, mask head and mask scoring of ``cfg``."""
    qe, ms = cfg.query_encoder, cfg.mask_scoring
    query_encoder = None
    if qe.ffn or qe.o2o or qe.b2o:
        query_encoder = QueryEncoder(
            dim=d_model,
            roi_dim=box_dim,
            o2o=qe.o2o,
            b2o=qe.b2o,
            ffn=qe.ffn,
            heads=qe.heads,
            ffn_hidden=int(round(qe.ffn_ratio * d_model)),
        )
    head: DotProductHead | SegmenterHead
    if cfg.mask_head.kind == "dot":
        head = DotProductHead(query_dim=d_model, feature_dim=box_dim)
    else:
        head = SegmenterHead(query_dim=d_model, feature_dim=box_dim)
    scoring = None
    if ms.enabled:
        scoring = MaskScoringHead(
            in_dim=box_dim,
            channels=ms.channels,
            convs=ms.convs,
            pool=ms.pool,
            fc_dim=ms.fc_dim,
            fc_layers=ms.fc_layers,
            detach_mask=ms.detach_mask,
        )
    return query_encoder, head, scoring
