"""Blocks of the mask network's encoders, one file per block kind, registered by name.

- :mod:`.registry` — :class:`EncoderBlock` (the common interface of a block kind: build a stack for
  the image or the box encoder, run it on maps + valid sizes or on RoI maps), :func:`register_block`,
  :func:`get_block`, :func:`block_names` (the names the config accepts);
- :mod:`.deformable`, :mod:`.swin`, :mod:`.convnext` — the paper's three kinds (eq. 6-8, Tables 2-3);
- :mod:`.common` — valid-region masks and the query encoder's :class:`Attention`.

A new kind is one file here defining an :class:`EncoderBlock` subclass decorated with
``@register_block("name")``, plus its module in the import line below.
"""

from mfdetr.layers import FFN
from mfdetr.masknet.blocks import convnext, deformable, swin  # noqa: F401  (registers the built-in kinds)
from mfdetr.masknet.blocks.common import Attention, masked_fill_outside, valid_mask
from mfdetr.masknet.blocks.convnext import ConvNeXtBlock
from mfdetr.masknet.blocks.registry import (
    BlockArgs,
    EncoderBlock,
    FirstLevelBlock,
    block_names,
    check_block_name,
    get_block,
    register_block,
)
from mfdetr.masknet.blocks.swin import SwinBlock, WindowAttention

__all__ = [
    "FFN",
    "Attention",
    "BlockArgs",
    "ConvNeXtBlock",
    "EncoderBlock",
    "FirstLevelBlock",
    "SwinBlock",
    "WindowAttention",
    "block_names",
    "check_block_name",
    "get_block",
    "masked_fill_outside",
    "register_block",
    "valid_mask",
]
