"""Swin Transformer backbone, as used by DINO (``swin_L_384_22k``) and H-Deformable-DETR (Swin-L).

Origin: our own code, written from the facts of the official detection backbone
(IDEA-Research/DINO @ faa8520 ``models/dino/swin_transformer.py``, Apache-2.0, itself from
SwinTransformer/Swin-Transformer-Object-Detection; H-Deformable-DETR @ f58ceb1
``models/swin_transformer.py`` has the same math). Parameter and buffer names below the detector's
key prefix equal the official ones (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``...attn.relative_position_index`` (int64, persistent), ``layers.{i}.downsample.reduction``,
``norm{i}``), so an official state dict loads after a prefix rename only: ``backbone.0.`` in DINO,
``backbone.0.body.`` in H-Deformable-DETR (the detector's remapper strips it).

Differences from the official module (none changes the forward values):
- inference only: no drop-path, no dropout, no gradient checkpointing, no ``ape`` (absolute
  position embedding, off in every detector config), no ``dilation``, no frozen stages;
- tokens travel channel-last ``[B, H, W, C]`` instead of ``[B, H*W, C]``;
- the forward returns ``{stage: [B, C, ceil(H/s), ceil(W/s)]}`` for ``out_indices`` ∪ {0}
  (:class:`~mfdetr.detectors.backbones.base.Backbone` contract): stage 0 (stride 4) is the C1 map of
  Mask Frozen-DETR (eq. 1) and is returned raw (without ``norm0``) when 0 is not in ``out_indices``;
- stages after the last returned one are not run.

Official semantics kept: the image is padded on the right/bottom to a multiple of the patch size;
inside every block the (normed) tokens are zero-padded on the right/bottom to a multiple of the
window, so padded tokens take part in attention (the official behaviour); odd-sized maps are
zero-padded before patch merging; shifted windows use shift ``window // 2`` with the official
region mask (value -100 between regions). Consequence: zero padding of the *image* beyond the patch
multiple is real input (padded tokens are attended to), so an image alone and the same image inside
a larger padded batch give different maps near the right/bottom border, exactly as in the official
code (the official DINO evaluation runs batch size 1). Checked against the official modules (random
weights, float32, CPU, tiny and full Swin-L, batch 1 and 2, odd sizes): bit-identical outputs.

Where it is used:

- ``dino_swinl`` (5-scale): the equivalent of ``build_swin_l_dino(out_indices=(0, 1, 2, 3))``; backbone channels
  ``[s.channels for s in backbone.out_specs]`` = 192, 384, 768, 1536; checkpoint prefix
  ``backbone.0.`` → the backbone module.
- ``dino_swinl_4scale``: ``build_swin_l_dino(out_indices=(1, 2, 3))`` (no ``norm0``; C1 is the raw
  stage-0 output).
- H-Deformable-DETR Swin-L: ``build_swin_l_hdetr()`` (window 7, out_indices (1, 2, 3)); checkpoint
  prefix ``backbone.0.body.``.
- Backbone factory (``backbones/factory.py``): kind ``"swin"`` → :func:`swin_backbone` (registered
  lazily in ``backbones/__init__.py``); ``BackboneConfig(kind="swin",
  out_indices=(0, 1, 2, 3), params={"window_size": 12, ...})`` (params = :class:`SwinConfig` fields,
  defaults = Swin-L 384).
- Tiny test versions: ``build_swin(SwinConfig(embed_dim=16, depths=(1, 1, 2, 1),
  num_heads=(1, 2, 2, 4), window_size=3, out_indices=...))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.backbones.base import StagedTokenBackbone, check_out_indices
from mfdetr.errors import MfdetrError
from mfdetr.layers import (
    FFN,
    relative_position_bias,
    relative_position_index,
    shifted_window_regions,
    window_partition,
    window_reverse,
)

__all__ = [
    "PatchEmbed",
    "PatchMerging",
    "SwinBlock",
    "SwinConfig",
    "SwinStage",
    "SwinTransformer",
    "WindowAttention",
    "build_swin",
    "build_swin_l_dino",
    "build_swin_l_hdetr",
    "check_out_indices",
    "swin_backbone",
]


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: pad right/bottom to a multiple of ``patch_size``, conv, LN.

    ``[B, C_in, H, W]`` → ``[B, ceil(H/p), ceil(W/p), C]`` (channel-last).
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


def shifted_window_mask(
    hp: int, wp: int, window: int, shift: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Attention mask of shifted windows, ``[nW, N, N]``: 0 within a region, -100 across regions.

    After the cyclic shift by ``-shift`` the padded map ``[Hp, Wp]`` splits into 3×3 regions
    (rows/cols ``[0, Hp-w)``, ``[Hp-w, Hp-shift)``, ``[Hp-shift, Hp)``); tokens of different
    regions must not attend to each other (the official mask, value -100 as in the official code).
    """
    regions = shifted_window_regions(hp, wp, window, shift, device=device)  # [nW, N]
    n = regions.shape[1]
    different = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(regions.shape[0], n, n, device=device, dtype=dtype).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``x [B*nW, N, C]``, optional ``mask [nW, N, N]`` (added to the logits) → ``[B*nW, N, C]``.
    Logits: ``(q * head_dim^-0.5) @ k^T + table[relative_position_index]``.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise MfdetrError(f"swin: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent: the official state dict contains it (int64, [N, N]).
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*nW, nH, N, d]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Swin block (pre-norm): ``x + W-MSA(LN(x))`` (shifted if ``shift > 0``), then ``x + MLP(LN(x))``.

    ``x [B, H, W, C]`` → same shape. The normed map is zero-padded right/bottom to window
    multiples before partitioning (official), and cropped back after.
    """

    def __init__(
        self, *, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise MfdetrError(f"swin: shift {shift_size} must lie in [0, window {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FFN(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = F.pad(self.norm1(x), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1:3]
        if s > 0:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), mask=shift_mask if s > 0 else None)
        y = window_reverse(y, ws, hp, wp)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 patch merging: ``[B, H, W, C]`` → ``[B, ceil(H/2), ceil(W/2), 2C]``.

    Odd sizes are zero-padded right/bottom; the 4 neighbours are concatenated in the official order
    (0,0), (1,0), (0,1), (1,1) (row, col offsets), then LN(4C) and a bias-free Linear(4C, 2C).
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One stage (official ``BasicLayer``): blocks alternating W-MSA / SW-MSA, optional merging.

    ``forward(x [B, H, W, C])`` returns ``(stage_out [B, H, W, C], next_in [B, H', W', C'])``; without
    ``downsample`` the second element is ``None``.
    """

    def __init__(self, *, blocks: Sequence[SwinBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.window_size = blocks[0].window_size
        self.shift_size = max(blk.shift_size for blk in blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        ws = self.window_size
        mask = None
        if self.shift_size > 0:
            h, w = x.shape[1:3]
            mask = shifted_window_mask(
                h + (-h) % ws, w + (-w) % ws, ws, self.shift_size, device=x.device, dtype=x.dtype
            )
        for blk in self.blocks:
            x = blk(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class SwinTransformer(StagedTokenBackbone):
    """Swin Transformer detection backbone (four stages, strides ``p·2^i``, p = patch size).

    Args:
        patch_embed: stem producing stage-0 tokens ``[B, H/p, W/p, C0]``.
        stages: four :class:`SwinStage`; stage i has ``channels[i]`` channels.
        channels: output channels per stage (``embed_dim · 2^i``).
        patch_size: stride of stage 0 (4 in every detector).
        out_indices: stages the detector uses; each gets its own LayerNorm ``norm{i}``.

    ``forward(x [B, 3, H, W])`` → ``{i: [B, C_i, ceil(H/(p·2^i)), ceil(W/(p·2^i))]}`` for
    ``out_indices`` ∪ {0}, channel-first, contiguous.
    """

    def __init__(
        self,
        *,
        patch_embed: PatchEmbed,
        stages: Sequence[SwinStage],
        channels: Sequence[int],
        patch_size: int,
        out_indices: Sequence[int],
    ) -> None:
        super().__init__(
            name="swin",
            patch_embed=patch_embed,
            stages=stages,
            channels=channels,
            patch_size=patch_size,
            out_indices=out_indices,
        )


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin backbone (defaults: DINO's ``swin_L_384_22k``, 5-scale outputs)."""

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3
    patch_norm: bool = True
    qkv_bias: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    def __post_init__(self) -> None:  # TOML gives lists: store tuples (hashable, comparable)
        for name in ("depths", "num_heads", "out_indices"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))


def build_swin(cfg: SwinConfig) -> SwinTransformer:
    """Build a :class:`SwinTransformer` from ``cfg`` (random init; load a checkpoint afterwards)."""
    if len(cfg.depths) != 4 or len(cfg.num_heads) != 4:
        raise MfdetrError(f"swin: depths and num_heads need 4 entries, got {cfg.depths}, {cfg.num_heads}")
    if cfg.window_size < 1 or min(cfg.depths) < 1:
        raise MfdetrError(f"swin: window_size and depths must be >= 1 (got {cfg.window_size}, {cfg.depths})")
    channels = [cfg.embed_dim * 2**i for i in range(4)]
    stages = []
    for i, (dim, depth, heads) in enumerate(zip(channels, cfg.depths, cfg.num_heads)):
        blocks = [
            SwinBlock(
                dim=dim,
                num_heads=heads,
                window_size=cfg.window_size,
                shift_size=0 if j % 2 == 0 else cfg.window_size // 2,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
            )
            for j in range(depth)
        ]
        stages.append(SwinStage(blocks=blocks, downsample=PatchMerging(dim=dim) if i < 3 else None))
    patch_embed = PatchEmbed(
        patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, patch_norm=cfg.patch_norm
    )
    return SwinTransformer(
        patch_embed=patch_embed,
        stages=stages,
        channels=channels,
        patch_size=cfg.patch_size,
        out_indices=cfg.out_indices,
    )


def swin_backbone(*, out_indices: Sequence[int], **params: Any) -> SwinTransformer:
    """Builder for the backbone factory's kind ``"swin"``: ``params`` are :class:`SwinConfig` fields.

    Unknown parameter names raise ``TypeError`` (the factory turns it into an ``MfdetrError``).
    """
    return build_swin(SwinConfig(out_indices=tuple(out_indices), **params))


def build_swin_l_dino(out_indices: Sequence[int] = (0, 1, 2, 3)) -> SwinTransformer:
    """DINO's ``swin_L_384_22k``: embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12.

    ``out_indices`` (0, 1, 2, 3) for 5-scale DINO, (1, 2, 3) for 4-scale.
    """
    return build_swin(
        SwinConfig(
            embed_dim=192,
            depths=(2, 2, 18, 2),
            num_heads=(6, 12, 24, 48),
            window_size=12,
            out_indices=tuple(out_indices),
        )
    )


def build_swin_l_hdetr() -> SwinTransformer:
    """H-Deformable-DETR's Swin-L (``swin_large``): as DINO's but window 7, out_indices (1, 2, 3)."""
    return build_swin(
        SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7, out_indices=(1, 2, 3))
    )
