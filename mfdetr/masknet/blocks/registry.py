"""The registry of the mask network's encoder blocks and their common interface.

A block kind (``"deformable"``, ``"swin"``, ``"convnext"``, ...) is one :class:`EncoderBlock` subclass
in one file of this package, registered by name with :func:`register_block`. The image and box
feature encoders only ever talk to this interface, and the config accepts exactly the registered
names (:func:`check_block_name`), so adding a block kind is one file plus one registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mfdetr.masknet.blocks.common import masked_fill_outside


@dataclass(frozen=True)
class BlockArgs:
    """The keyword arguments every block builder receives; each kind uses the ones it needs.

    Args:
        dim: token width.
        heads: attention heads (deformable, swin).
        points: deformable sampling points per head and level.
        ffn_hidden: FFN hidden width (``round(ffn_ratio · dim)``).
        window: attention window (swin).
        kernel: depth-wise convolution kernel (convnext).
        level_embed: image encoder: learn a per-level embedding where the kind uses one (deformable).
    """

    dim: int
    heads: int = 8
    points: int = 4
    ffn_hidden: int = 1024
    window: int = 16
    kernel: int = 7
    level_embed: bool = True


Built = tuple[list[nn.Module], nn.Parameter | None]


class EncoderBlock(ABC):
    """One kind of encoder block: how to build a stack of it and run the stack in both encoders.

    The encoders own the built modules (``layers`` and the optional learned embedding, so parameter
    names stay ``image_encoder.layers.{i}...`` / ``image_encoder.level_embed`` /
    ``box_encoder.pos_embed``); a kind holds no state of its own.
    """

    @abstractmethod
    def build_image(self, count: int, args: BlockArgs, *, levels: int) -> Built:
        """``count`` blocks for the image encoder over ``levels`` maps, plus an optional embedding."""

    @abstractmethod
    def build_box(self, count: int, args: BlockArgs, *, roi_size: int) -> Built:
        """``count`` blocks for the box encoder over S×S RoI maps, plus an optional embedding."""

    @abstractmethod
    def encode_maps(
        self,
        layers: nn.ModuleList,
        maps: list[Tensor],
        valid_hw: Tensor,
        embed: Tensor | None,
        *,
        first_level_only: bool,
        needed: Tensor | None = None,
        checkpoint_tokens: int = 0,
    ) -> list[Tensor]:
        """Image encoder: ``maps`` per level [B, d, H_l, W_l], zero outside ``valid_hw`` [B, L, 2] → the
        refined maps (zero outside); only E_1 (a one-element list) with ``first_level_only``.

        ``needed`` [B, H_1, W_1] (with ``first_level_only``): the only E_1 tokens the caller will read; a
        kind may leave the others at any value to save work (``None``: every token is read).
        ``checkpoint_tokens``: see :class:`~mfdetr.masknet.config.MaskNetConfig` (a kind may ignore it)."""

    @abstractmethod
    def encode_rois(
        self, layers: nn.ModuleList, rois: Tensor, embed: Tensor | None, *, checkpoint_tokens: int = 0
    ) -> Tensor:
        """Box encoder: ``rois`` [N, D, S, S] → tokens [N, S·S, D] (row-major over each RoI)."""


class FirstLevelBlock(EncoderBlock):
    """A kind that refines only the highest-resolution level E_1 (the other levels pass through)."""

    @abstractmethod
    def encode_map(self, layers: nn.ModuleList, x: Tensor, valid_hw: Tensor) -> Tensor:
        """E_1 [B, d, H, W] with valid sizes [B, 2] → refined [B, d, H, W] (any values outside)."""

    def encode_maps(
        self,
        layers: nn.ModuleList,
        maps: list[Tensor],
        valid_hw: Tensor,
        embed: Tensor | None,
        *,
        first_level_only: bool,
        needed: Tensor | None = None,
        checkpoint_tokens: int = 0,
    ) -> list[Tensor]:
        v0 = valid_hw[:, 0]
        x = masked_fill_outside(self.encode_map(layers, maps[0], v0), v0)
        return [x] if first_level_only else [x, *maps[1:]]


_BLOCKS: dict[str, EncoderBlock] = {}


def register_block(name: str) -> Callable[[type[EncoderBlock]], type[EncoderBlock]]:
    """Class decorator: register an :class:`EncoderBlock` subclass under ``name`` (unique)."""

    def wrap(cls: type[EncoderBlock]) -> type[EncoderBlock]:
        if name in _BLOCKS:
            raise ValueError(f"encoder block {name!r} is already registered")
        _BLOCKS[name] = cls()
        return cls

    return wrap


def block_names() -> tuple[str, ...]:
    """The registered block kinds, sorted."""
    return tuple(sorted(_BLOCKS))


def check_block_name(name: str) -> str:
    """``name`` if it is a registered block kind, else ``ValueError`` listing the known ones."""
    if name not in _BLOCKS:
        raise ValueError(f"block {name!r} is not one of {list(block_names())}")
    return name


def get_block(name: str) -> EncoderBlock:
    """The registered block kind ``name`` (``ValueError`` listing the known ones otherwise)."""
    return _BLOCKS[check_block_name(name)]
