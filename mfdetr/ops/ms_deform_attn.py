"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2020) in plain PyTorch.

Semantics follow the official CUDA op of fundamentalvision/Deformable-DETR (shared unchanged by DINO,
FocalNet-DINO and H-Deformable-DETR): bilinear sampling with zero padding, sampling locations
normalised to [0, 1] per level (x by the level's width, y by its height, pixel centres at
``(i + 0.5) / size``), attention weights already softmax-normalised over levels × points.

Two implementations of the core:

- :func:`ms_deform_attn` — the one we run: one ``F.grid_sample`` per level (differentiable with a
  memory-lean backward, device-agnostic, AMP-friendly: sampling runs in the value's dtype, float32
  under autocast).
- :func:`ms_deform_attn_reference` — a direct gather-based bilinear computation, written from the
  definition, used by tests and the benchmark to check the former.

:class:`MSDeformAttn` is the attention module with the official parameter names
(``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) so released
checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: level sizes: an [L, 2] int64 tensor of (H_l, W_l), or a sequence of (H_l, W_l) pairs. The pairs may
#: be symbolic sizes (``torch.export`` / ONNX export with dynamic shapes), which a tensor cannot carry.
SpatialShapes = Tensor | Sequence[tuple[int, int]]


def level_shapes(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``(H_l, W_l)`` per level (pairs are passed through unchanged, symbolic sizes included)."""
    if isinstance(spatial_shapes, Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def shapes_tensor(spatial_shapes: SpatialShapes, device: torch.device | str | None = None) -> Tensor:
    """[L, 2] int64 (H_l, W_l); built from sizes with ``torch.full`` so symbolic sizes stay symbolic."""
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device=device, dtype=torch.long)
    return torch.stack(
        [
            torch.stack(
                [torch.full((), h, dtype=torch.long, device=device), torch.full((), w, dtype=torch.long, device=device)]
            )
            for h, w in spatial_shapes
        ]
    )


def _check(value: Tensor, spatial_shapes: SpatialShapes, loc: Tensor, attn: Tensor) -> list[tuple[int, int]]:
    if value.dim() != 4 or loc.dim() != 6 or attn.dim() != 5:
        raise ValueError(
            "expected value [B,S,H,Dh], sampling_locations [B,Q,H,L,P,2], "
            f"attention_weights [B,Q,H,L,P]; got {tuple(value.shape)}, "
            f"{tuple(loc.shape)}, {tuple(attn.shape)}"
        )
    shapes = level_shapes(spatial_shapes)
    if isinstance(spatial_shapes, Tensor):  # symbolic pairs are tied to the maps by construction
        total = sum(h * w for h, w in shapes)
        if value.shape[1] != total:
            raise ValueError(f"value has {value.shape[1]} tokens but spatial_shapes sum to {total}")
    return shapes


def ms_deform_attn(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: [B, S, H, Dh] values of all levels, flattened (row-major per level) and concatenated.
        spatial_shapes: [L, 2] (H_l, W_l) of each level, int64, or the (H_l, W_l) pairs.
        sampling_locations: [B, Q, H, L, P, 2] (x, y) in [0, 1] per level; outside means zeros.
        attention_weights: [B, Q, H, L, P] weights (softmax over L·P done by the caller).

    Returns:
        [B, Q, H·Dh] attended values.

    Level by level, the sampled values [B·H, Dh, Q, P] are weighted and summed at once, so no
    [B·H, Dh, Q, L, P] tensor is ever built. When a gradient is needed, :class:`_SampleAndWeigh`
    keeps only its inputs and samples again in the backward pass: the autograd graph then holds
    O(Q·H·L·P) numbers for this op instead of O(Q·H·L·P·Dh) (the encoder's dominant activation).
    """
    shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
    bsz, _, heads, dh = value.shape
    _, nq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    ct = _compute_dtype(value)
    # [B*H, Dh, h, w] per level
    maps = [v.flatten(2).transpose(1, 2).reshape(bsz * heads, dh, h, w).to(ct) for v, (h, w) in zip(values, shapes)]
    # [B, Q, H, L, P, 2] -> [B*H, Q, L, P, 2] in grid_sample's [-1, 1] frame; weights -> [B*H, Q, L, P]
    grids = (2 * sampling_locations.to(ct) - 1).transpose(1, 2).flatten(0, 1)
    w = attention_weights.to(ct).transpose(1, 2).flatten(0, 1)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights)
    )
    out = _SampleAndWeigh.apply(grids, w, *maps) if needs_grad else _sample_and_weigh(maps, grids, w)
    # [B*H, Dh, Q] -> [B, Q, H*Dh]
    return out.view(bsz, heads * dh, nq).transpose(1, 2).contiguous().to(value.dtype)


def ms_deform_attn_grouped(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    counts: Sequence[int],
) -> Tensor:
    """:func:`ms_deform_attn` for queries of several images in one flat list: ``sampling_locations``
    [1, T, H, L, P, 2] and ``attention_weights`` [1, T, H, L, P] hold ``counts[b]`` queries of image b of
    ``value`` [B, S, H, Dh] in turn → [1, T, H·Dh] (no image padded to the others' count)."""
    if len(counts) != value.shape[0] or sum(counts) != sampling_locations.shape[1]:
        raise ValueError(
            f"counts {list(counts)} do not fit {value.shape[0]} images and {sampling_locations.shape[1]} queries"
        )
    outs, start = [], 0
    for b, c in enumerate(counts):
        if c:
            part = slice(start, start + c)
            outs.append(
                ms_deform_attn(
                    value[b : b + 1], spatial_shapes, sampling_locations[:, part], attention_weights[:, part]
                )
            )
        start += c
    if not outs:
        return value.new_zeros(1, 0, value.shape[2] * value.shape[3])
    return torch.cat(outs, 1)


def _compute_dtype(value: Tensor) -> torch.dtype:
    """Sampling runs in the value's dtype, except float32 for half values under autocast (as autocast
    itself runs ``grid_sample``)."""
    half = value.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and torch.is_autocast_enabled(value.device.type) else value.dtype


#: the samples of one :class:`_SampleAndWeigh` call up to this many bytes are kept for the backward
#: pass instead of being drawn again there (small calls: a RoI map, a few thousand tokens)
KEEP_SAMPLES_BYTES = 32 << 20


def _sample_and_weigh(maps: Sequence[Tensor], grids: Tensor, w: Tensor, keep: list[Tensor] | None = None) -> Tensor:
    """Σ_l Σ_p w[:, q, l, p] · bilinear(maps[l], grids[:, q, l, p]) → [B·H, Dh, Q]; with ``keep``, each
    level's samples [B·H, Dh, Q, P] are appended to it."""
    out = None
    for lvl, m in enumerate(maps):
        s = F.grid_sample(m, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        if keep is None:
            part = s.mul_(w[:, None, :, lvl]).sum(-1)  # [B*H, Dh, Q]; s is a temporary
        else:
            keep.append(s)
            part = (s * w[:, None, :, lvl]).sum(-1)
        out = part if out is None else out + part
    assert out is not None
    return out


class _SampleAndWeigh(torch.autograd.Function):
    """:func:`_sample_and_weigh` with a backward pass that samples again instead of storing samples (or
    keeps them, up to :data:`KEEP_SAMPLES_BYTES`)."""

    @staticmethod
    def forward(ctx, grids: Tensor, w: Tensor, *maps: Tensor) -> Tensor:  # type: ignore[override]
        size = w.numel() * maps[0].shape[1] * w.element_size()  # B·H · Q · L · P samples of Dh values
        keep: list[Tensor] | None = [] if ctx.needs_input_grad[1] and size <= KEEP_SAMPLES_BYTES else None
        with torch.autocast(grids.device.type, enabled=False):
            out = _sample_and_weigh(maps, grids, w, keep)
        ctx.kept = 0 if keep is None else len(keep)
        ctx.save_for_backward(grids, w, *maps, *(keep or []))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grids, w, *saved = ctx.saved_tensors
        maps, kept = saved[: len(saved) - ctx.kept], saved[len(saved) - ctx.kept :]
        need_g, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_g = torch.zeros_like(grids) if need_g else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_maps: list[Tensor | None] = []
        g = grad_out.to(w.dtype)
        for lvl, m in enumerate(maps):
            gl = grids[:, :, lvl]
            if need_w:
                if kept:
                    s = kept[lvl].mul(g[..., None])
                else:
                    s = F.grid_sample(m, gl, mode="bilinear", padding_mode="zeros", align_corners=False)
                    s.mul_(g[..., None])
                grad_w[:, :, lvl] = s.sum(1)  # type: ignore[index]
            need_m = ctx.needs_input_grad[2 + lvl]
            if not (need_m or need_g):
                grad_maps.append(None)
                continue
            gs = g[..., None] * w[:, None, :, lvl]  # d out / d samples: [B*H, Dh, Q, P]
            # aten's own bilinear/zeros/align_corners=False backward (modes 0, 0)
            gm, gg = torch.ops.aten.grid_sampler_2d_backward(gs, m, gl, 0, 0, False, [need_m, need_g])
            if need_g:
                grad_g[:, :, lvl] = gg  # type: ignore[index]
            grad_maps.append(gm if need_m else None)
        return (grad_g, grad_w, *grad_maps)


def ms_deform_attn_reference(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Direct computation from the definition (gather the 4 neighbours, zero outside the map).

    Same arguments and result as :func:`ms_deform_attn`; slow, for tests and benchmarks only.
    """
    shapes = _check(value, spatial_shapes, sampling_locations, attention_weights)
    bsz, _, heads, dh = value.shape
    _, nq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_zeros(bsz, nq, heads, dh)
    start = 0
    for lvl in range(n_levels):
        h, w = shapes[lvl]
        v = value[:, start : start + h * w]  # [B, hw, H, Dh]
        start += h * w
        # pixel coordinates with centres at integers: x_pix = x * w - 0.5
        x = sampling_locations[:, :, :, lvl, :, 0] * w - 0.5  # [B, Q, H, P]
        y = sampling_locations[:, :, :, lvl, :, 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        acc = value.new_zeros(bsz, nq, heads, n_points, dh)
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                wx = 1 - (x - xi).abs()
                wy = 1 - (y - yi).abs()
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()  # [B, Q, H, P]
                # gather v[b, idx, head, :]
                vb = v.permute(0, 2, 1, 3)  # [B, H, hw, Dh]
                gidx = idx.permute(0, 2, 1, 3).reshape(bsz, heads, nq * n_points, 1).expand(-1, -1, -1, dh)
                g = torch.gather(vb, 2, gidx).view(bsz, heads, nq, n_points, dh).permute(0, 2, 1, 3, 4)
                acc = acc + g * (wx * wy * inside)[..., None]
        out = out + (acc * attention_weights[:, :, :, lvl, :, None]).sum(dim=3)
    return out.reshape(bsz, nq, heads * dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (official parameter names and initialisation).

    Args:
        d_model: width of queries and values.
        n_levels: number of feature levels.
        n_heads: attention heads (``d_model`` must divide evenly).
        n_points: sampling points per head and level.
    """

    def __init__(self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Tensor | None = None,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the multi-scale ``input_flatten``.

        Args:
            query: [B, Q, d].
            reference_points: [B, Q, L, 2] (x, y) in [0, 1], or [B, Q, L, 4] boxes (cx, cy, w, h),
                per level (already multiplied by each level's valid ratio).
            input_flatten: [B, S, d] all levels flattened and concatenated.
            input_spatial_shapes: [L, 2] (H_l, W_l), or the (H_l, W_l) pairs.
            input_level_start_index: [L] start of each level in ``input_flatten`` (unused; kept for
                the official call signature).
            input_padding_mask: [B, S] True at padding tokens (their values are zeroed).

        Returns:
            [B, Q, d].
        """
        return self.attend(
            query, reference_points, self.project_values(input_flatten, input_padding_mask), input_spatial_shapes
        )

    def project_values(self, input_flatten: Tensor, input_padding_mask: Tensor | None = None) -> Tensor:
        """The values every query samples: ``input_flatten`` [B, S, d] → [B, S, heads, d / heads], zero at
        the padding tokens ``input_padding_mask`` [B, S]."""
        bsz, ns, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(bsz, ns, self.n_heads, self.d_model // self.n_heads)

    def attend(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        input_spatial_shapes: SpatialShapes,
        *,
        counts: Sequence[int] | None = None,
    ) -> Tensor:
        """:meth:`forward` on values already projected (:meth:`project_values`). With ``counts``, ``query``
        [1, T, d] (and its reference points) holds ``counts[b]`` queries of image b of ``value`` in turn."""
        bsz, nq, _ = query.shape
        offsets = self.sampling_offsets(query).view(bsz, nq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(bsz, nq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(bsz, nq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            hw = shapes_tensor(input_spatial_shapes, query.device)
            normalizer = torch.stack([hw[..., 1], hw[..., 0]], -1)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :].to(
                offsets.dtype
            )
        elif reference_points.shape[-1] == 4:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        if counts is None:
            out = ms_deform_attn(value, input_spatial_shapes, loc, weights)
        else:
            out = ms_deform_attn_grouped(value, input_spatial_shapes, loc, weights, counts)
        return self.output_proj(out)
