"""The staged-token backbone base shared by Swin and FocalNet: per-output norms and raw stage 0."""

from __future__ import annotations

import pytest
import torch

from tests._backbones import randomize_, tiny_focalnet, tiny_swin


@pytest.mark.parametrize("tiny", [tiny_swin, tiny_focalnet], ids=["swin", "focalnet"])
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2, 3)])
def test_norms_exist_only_for_out_indices_and_stage0_raw_otherwise(tiny, out_indices):
    model = tiny(out_indices)
    randomize_(model)
    keys = model.state_dict().keys()
    for i in range(4):
        assert (f"norm{i}.weight" in keys) == (i in out_indices)
    raw = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(i, o[0]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 29, 41))
    for i, t in out.items():
        ref = getattr(model, f"norm{i}")(raw[i]) if i in out_indices else raw[i]
        torch.testing.assert_close(t, ref.permute(0, 3, 1, 2), rtol=0, atol=0)
