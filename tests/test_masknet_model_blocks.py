"""Building blocks against their definitions: the Swin block's padded shifted windows equal the
official cyclic-shift + mask formulation (Liu et al. 2021) wherever the map is a multiple of the window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mfdetr.masknet.blocks import SwinBlock


def reference_swin_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Official Swin block: roll by -shift, window partition, mask between the rolled-in regions
    (-100 as in the official code), relative position bias, reverse roll."""
    b, h, w, c = x.shape
    win, s, heads = blk.window, blk.shift, blk.attn.heads
    y = blk.norm1(x)
    if s:
        y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        img = torch.zeros(1, h, w)
        cnt = 0
        for hs in (slice(0, -win), slice(-win, -s), slice(-s, None)):
            for ws in (slice(0, -win), slice(-win, -s), slice(-s, None)):
                img[:, hs, ws] = cnt
                cnt += 1
        mw = img.view(1, h // win, win, w // win, win).transpose(2, 3).reshape(-1, win * win)
        mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0  # [nW, n, n]
    else:
        mask = torch.zeros(1, win * win, win * win)
    yw = y.view(b, h // win, win, w // win, win, c).transpose(2, 3).reshape(b, -1, win * win, c)
    qkv = blk.attn.qkv(yw).view(b, yw.shape[1], win * win, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    n = win * win
    bias = blk.attn.relative_position_bias_table[blk.attn.relative_position_index.view(-1)]
    bias = bias.view(n, n, heads).permute(2, 0, 1)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-1, -2) + bias + mask[None, :, None]
    out = (attn.softmax(-1) @ v).transpose(2, 3).reshape(b, -1, n, c)
    out = blk.attn.proj(out).view(b, h // win, w // win, win, win, c).transpose(2, 3).reshape(b, h, w, c)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    x = x + out
    return x + blk.ffn(blk.norm2(x))


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_official_formulation(shift: int) -> None:
    blk = SwinBlock(dim=16, heads=4, window=4, shift=shift, ffn_hidden=32)
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 8, 12, 16)
    torch.testing.assert_close(blk(x), reference_swin_block(blk, x), atol=1e-5, rtol=1e-5)


def test_swin_block_valid_region_ignores_padding() -> None:
    blk = SwinBlock(dim=16, heads=4, window=4, shift=2, ffn_hidden=32)
    x = torch.randn(1, 7, 9, 16)
    big = F.pad(x.permute(0, 3, 1, 2), (0, 6, 0, 5), value=3.0).permute(0, 2, 3, 1)
    valid = torch.zeros(1, 12, 15, dtype=torch.bool)
    valid[:, :7, :9] = True
    torch.testing.assert_close(blk(big, valid)[:, :7, :9], blk(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 3])
def test_image_encoder_first_level_equals_the_full_encoders_first_level(layers: int) -> None:
    """The last deformable layer updating only E_1's tokens gives E_1 and its gradients exactly as the
    full encoder does (float64), with two differently padded images."""
    from mfdetr.masknet.image_encoder import build_image_encoder

    torch.manual_seed(0)
    enc = build_image_encoder(block="deformable", layers=layers, dim=16, levels=3, heads=2, points=2).double()
    for p in enc.parameters():  # the official init leaves the attention weights at zero
        p.data.add_(0.05 * torch.randn_like(p))
    sizes = ((12, 16), (6, 8), (3, 4))
    valid = torch.tensor([[[12, 16], [6, 8], [3, 4]], [[9, 11], [5, 6], [3, 3]]])
    maps = [torch.randn(2, 16, h, w, dtype=torch.float64) for h, w in sizes]
    for m, lvl in zip(maps, range(3), strict=True):
        for b in range(2):
            m[b, :, valid[b, lvl, 0] :] = 0
            m[b, :, :, valid[b, lvl, 1] :] = 0
    g = torch.randn(2, 16, 12, 16, dtype=torch.float64)
    full = enc(maps, valid)[0]
    grads_full = torch.autograd.grad((full * g).sum(), list(enc.parameters()))
    first = enc.first_level(maps, valid)
    grads_first = torch.autograd.grad((first * g).sum(), list(enc.parameters()))
    torch.testing.assert_close(first, full, rtol=0, atol=1e-12)
    for a, b in zip(grads_first, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
