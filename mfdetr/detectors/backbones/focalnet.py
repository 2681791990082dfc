"""FocalNet backbone (focal modulation networks), as used by FocalNet-DINO (``focalnet_L_384_22k_fl4``).

Origin: our own code, written from the facts of the official detection backbone
(FocalNet/FocalNet-DINO @ 23901e0 ``models/dino/focal.py``, MIT, Microsoft; the classification model
is microsoft/FocalNet ``classification/focalnet.py``). Parameter names below the detector's key
prefix equal the official ones (``patch_embed.proj``, ``layers.{i}.blocks.{j}.gamma_1``,
``...modulation.f``, ``...modulation.focal_layers.{k}.0``, ``...modulation.h``,
``...modulation.proj``, ``layers.{i}.downsample.proj``, ``norm{i}``), so an official state dict
loads after stripping the ``backbone.0.`` prefix.

Differences from the official module (none changes the forward values):
- inference only: no drop-path, no dropout, no gradient checkpointing, no frozen stages;
- tokens travel channel-last ``[B, H, W, C]`` instead of ``[B, H*W, C]``;
- the forward returns ``{stage: [B, C, ceil(H/s), ceil(W/s)]}`` for ``out_indices`` ∪ {0}
  (:class:`~mfdetr.detectors.backbones.base.Backbone` contract): stage 0 (stride 4) is the C1 map of
  Mask Frozen-DETR (eq. 1), returned raw (without ``norm0``) when 0 is not in ``out_indices``;
- stages after the last returned one are not run.

Official semantics kept (FocalNet-L fl4): focal level k is a depthwise conv of kernel
``focal_factor·k + focal_window`` (2k+3 → 3, 5, 7, 9) followed by GELU; global context is GELU of
the spatial mean of the last level; ``normalize_modulator`` divides the gated sum by
``focal_level + 1``; post-LN blocks ``x + γ1·LN(FM(x))``, ``x + γ2·LN(MLP(x))``; the stem and the
downsample layers pad right/bottom to a multiple of their patch size (4, resp. 2) before the conv
(``use_conv_embed``: 7×7 stride 4 pad 2, resp. 3×3 stride 2 pad 1). The convolutions see the
image's zero padding, so an image alone and inside a larger padded batch differ near the right/bottom
border, as in the official code. Checked against the official module (random weights, float32, CPU,
tiny and full FocalNet-L fl4, batch 1 and 2, odd sizes): bit-identical outputs.

Where it is used:

- ``dino_focal`` (5-scale): the equivalent of ``build_focalnet_l_fl4(out_indices=(0, 1, 2, 3))``; backbone channels
  ``[s.channels for s in backbone.out_specs]`` = 192, 384, 768, 1536; checkpoint prefix
  ``backbone.0.`` → the backbone module.
- Backbone factory (``backbones/factory.py``): kind ``"focalnet"`` → :func:`focalnet_backbone`
  (registered lazily in ``backbones/__init__.py``); ``BackboneConfig(kind="focalnet",
  out_indices=(0, 1, 2, 3), params={...})`` (params = :class:`FocalNetConfig` fields, defaults =
  FocalNet-L fl4).
- Tiny test versions: ``build_focalnet(FocalNetConfig(embed_dim=16, depths=(1, 1, 2, 1),
  focal_levels=2, out_indices=...))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.backbones.base import StagedTokenBackbone
from mfdetr.errors import MfdetrError
from mfdetr.layers import FFN

__all__ = [
    "FocalModulation",
    "FocalNet",
    "FocalNetBlock",
    "FocalNetConfig",
    "FocalNetStage",
    "FocalPatchEmbed",
    "build_focalnet",
    "build_focalnet_l_fl4",
    "focalnet_backbone",
]


class FocalModulation(nn.Module):
    """Focal modulation ``proj(q ⊙ h(Σ_l gate_l · ctx_l))`` on ``[B, H, W, C]`` (channel-last).

    ``f`` gives q (C), ctx (C) and ``focal_level + 1`` gates. ``ctx_l`` = GELU(dwconv_l(ctx_{l-1}))
    with kernel ``focal_factor·l + focal_window``; the last gate weighs the global context
    GELU(mean_{H,W}(ctx_L)). With ``normalize_modulator`` the sum is divided by ``focal_level + 1``.
    """

    def __init__(
        self,
        *,
        dim: int,
        focal_level: int,
        focal_window: int,
        focal_factor: int = 2,
        normalize_modulator: bool = False,
        use_postln_in_modulation: bool = False,
    ) -> None:
        super().__init__()
        if focal_level < 1 or focal_window < 1:
            raise MfdetrError(f"focalnet: focal_level and focal_window must be >= 1, got {focal_level}, {focal_window}")
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            ks = focal_factor * k + focal_window
            self.focal_layers.append(
                nn.Sequential(nn.Conv2d(dim, dim, kernel_size=ks, padding=ks // 2, groups=dim, bias=False), nn.GELU())
            )
        self.ln = nn.LayerNorm(dim) if use_postln_in_modulation else None

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[-1]
        # Channel-first contiguous, as the official code (same conv algorithms → same rounding).
        y = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(y, (c, c, self.focal_level + 1), 1)
        ctx_all = torch.zeros_like(ctx)
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level :]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        if self.ln is not None:
            out = self.ln(out)
        return self.proj(out)


class FocalNetBlock(nn.Module):
    """FocalNet block on ``[B, H, W, C]``.

    Post-LN (``use_postln``): ``x + γ1·LN1(FM(x))`` then ``x + γ2·LN2(MLP(x))``; pre-LN otherwise:
    ``x + γ1·FM(LN1(x))`` then ``x + γ2·MLP(LN2(x))``. γ are per-channel layer-scale parameters
    (``gamma_1``/``gamma_2``) when ``use_layerscale``, else 1.
    """

    def __init__(
        self,
        *,
        dim: int,
        modulation: FocalModulation,
        mlp_ratio: float,
        use_postln: bool,
        use_layerscale: bool,
        layerscale_value: float = 1e-4,
    ) -> None:
        super().__init__()
        self.use_postln = use_postln
        self.gamma_1: nn.Parameter | None = None
        self.gamma_2: nn.Parameter | None = None
        if use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layerscale_value))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layerscale_value))
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = modulation
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FFN(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_postln:
            y = self.norm1(self.modulation(x))
        else:
            y = self.modulation(self.norm1(x))
        x = x + (y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.norm2(self.mlp(x)) if self.use_postln else self.mlp(self.norm2(x))
        return x + (y if self.gamma_2 is None else self.gamma_2 * y)


class FocalPatchEmbed(nn.Module):
    """Stem / downsample: pad right/bottom to a multiple of ``patch_size``, conv, optional LN.

    ``[B, C_in, H, W]`` → ``[B, ceil(H/p), ceil(W/p), C]`` (channel-last). With ``use_conv_embed``
    the conv overlaps: 7×7 stride 4 pad 2 for the stem (``patch_size`` must be 4), 3×3 stride 2 pad 1
    for a downsample layer (``patch_size`` 2); otherwise kernel = stride = ``patch_size``.
    """

    def __init__(
        self, *, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool, is_stem: bool, patch_norm: bool
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:
            kernel, stride, pad = (7, 4, 2) if is_stem else (3, 2, 1)
            if stride != patch_size:
                raise MfdetrError(f"focalnet: use_conv_embed needs patch size {stride} here, got {patch_size}")
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=pad)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = self.proj(F.pad(x, (0, (-w) % p, 0, (-h) % p))).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class FocalNetStage(nn.Module):
    """One stage (official ``BasicLayer``): blocks, then an optional downsampling patch embed.

    ``forward(x [B, H, W, C])`` → ``(stage_out [B, H, W, C], next_in [B, ceil(H/2), ceil(W/2), 2C])``;
    without ``downsample`` the second element is ``None``.
    """

    def __init__(self, *, blocks: Sequence[FocalNetBlock], downsample: FocalPatchEmbed | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is None:
            return x, None
        b, h, w, c = x.shape
        # Same strides as the official ``x.transpose(1, 2).view(B, C, H, W)`` of [B, H*W, C] tokens:
        # PyTorch picks the conv / pad memory format from the strides, so this keeps bit-equality.
        return x, self.downsample(x.reshape(b, h * w, c).transpose(1, 2).view(b, c, h, w))


class FocalNet(StagedTokenBackbone):
    """FocalNet detection backbone (four stages, strides 4, 8, 16, 32).

    Args:
        patch_embed: stem producing stage-0 tokens ``[B, H/4, W/4, C0]``.
        stages: four :class:`FocalNetStage`; stage i has ``channels[i]`` channels.
        channels: output channels per stage (``embed_dim · 2^i``).
        patch_size: stride of stage 0 (4).
        out_indices: stages the detector uses; each gets its own LayerNorm ``norm{i}``.

    ``forward(x [B, 3, H, W])`` → ``{i: [B, C_i, ceil(H/2^(i+2)), ceil(W/2^(i+2))]}`` for
    ``out_indices`` ∪ {0}, channel-first, contiguous.
    """

    def __init__(
        self,
        *,
        patch_embed: FocalPatchEmbed,
        stages: Sequence[FocalNetStage],
        channels: Sequence[int],
        patch_size: int,
        out_indices: Sequence[int],
    ) -> None:
        super().__init__(
            name="focalnet",
            patch_embed=patch_embed,
            stages=stages,
            channels=channels,
            patch_size=patch_size,
            out_indices=out_indices,
        )


def _per_stage(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    vals = (int(value),) * 4 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(vals) != 4:
        raise MfdetrError(f"focalnet: {name} needs 1 or 4 values, got {value}")
    return vals


@dataclass(frozen=True)
class FocalNetConfig:
    """Architecture of a FocalNet backbone (defaults: FocalNet-DINO's ``focalnet_L_384_22k_fl4``).

    ``focal_levels`` / ``focal_windows``: one value for all stages or four values.
    """

    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    focal_levels: int | tuple[int, ...] = 4
    focal_windows: int | tuple[int, ...] = 3
    focal_factor: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3
    patch_norm: bool = True
    use_conv_embed: bool = True
    use_postln: bool = True
    use_postln_in_modulation: bool = False
    use_layerscale: bool = True
    layerscale_value: float = 1e-4
    normalize_modulator: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    def __post_init__(self) -> None:  # TOML gives lists: store tuples (hashable, comparable)
        for name in ("depths", "out_indices", "focal_levels", "focal_windows"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(int(v) for v in value))


def build_focalnet(cfg: FocalNetConfig) -> FocalNet:
    """Build a :class:`FocalNet` from ``cfg`` (random init; load a checkpoint afterwards)."""
    if len(cfg.depths) != 4 or min(cfg.depths) < 1:
        raise MfdetrError(f"focalnet: depths needs 4 entries >= 1, got {cfg.depths}")
    levels = _per_stage(cfg.focal_levels, "focal_levels")
    windows = _per_stage(cfg.focal_windows, "focal_windows")
    channels = [cfg.embed_dim * 2**i for i in range(4)]
    stages = []
    for i, (dim, depth) in enumerate(zip(channels, cfg.depths)):
        blocks = [
            FocalNetBlock(
                dim=dim,
                modulation=FocalModulation(
                    dim=dim,
                    focal_level=levels[i],
                    focal_window=windows[i],
                    focal_factor=cfg.focal_factor,
                    normalize_modulator=cfg.normalize_modulator,
                    use_postln_in_modulation=cfg.use_postln_in_modulation,
                ),
                mlp_ratio=cfg.mlp_ratio,
                use_postln=cfg.use_postln,
                use_layerscale=cfg.use_layerscale,
                layerscale_value=cfg.layerscale_value,
            )
            for _ in range(depth)
        ]
        downsample = None
        if i < 3:
            downsample = FocalPatchEmbed(
                patch_size=2,
                in_chans=dim,
                embed_dim=2 * dim,
                use_conv_embed=cfg.use_conv_embed,
                is_stem=False,
                patch_norm=True,
            )
        stages.append(FocalNetStage(blocks=blocks, downsample=downsample))
    patch_embed = FocalPatchEmbed(
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        use_conv_embed=cfg.use_conv_embed,
        is_stem=True,
        patch_norm=cfg.patch_norm,
    )
    return FocalNet(
        patch_embed=patch_embed,
        stages=stages,
        channels=channels,
        patch_size=cfg.patch_size,
        out_indices=cfg.out_indices,
    )


def focalnet_backbone(*, out_indices: Sequence[int], **params: Any) -> FocalNet:
    """Builder for the backbone factory's kind ``"focalnet"``: ``params`` are :class:`FocalNetConfig`
    fields. Unknown parameter names raise ``TypeError`` (the factory turns it into an ``MfdetrError``).
    """
    return build_focalnet(FocalNetConfig(out_indices=tuple(out_indices), **params))


def build_focalnet_l_fl4(out_indices: Sequence[int] = (0, 1, 2, 3)) -> FocalNet:
    """FocalNet-DINO's ``focalnet_L_384_22k_fl4``: embed 192, depths 2-2-18-2, 4 focal levels
    (kernels 3, 5, 7, 9), conv embedding, post-LN, layer scale, normalised modulator, MLP ratio 4.

    ``out_indices`` (0, 1, 2, 3) for the 5-scale DINO of the FocalNet-DINO release.
    """
    return build_focalnet(
        FocalNetConfig(
            embed_dim=192,
            depths=(2, 2, 18, 2),
            focal_levels=4,
            focal_windows=3,
            mlp_ratio=4.0,
            use_conv_embed=True,
            use_postln=True,
            use_postln_in_modulation=False,
            use_layerscale=True,
            normalize_modulator=True,
            out_indices=tuple(out_indices),
        )
    )
