"""The toy stage-2 task of the engine tests (:mod:`tests._toy_engine`) is deterministic per image."""

from __future__ import annotations

import torch

from tests._toy_engine import toy_item


def test_toy_item_is_deterministic() -> None:
    a, b = toy_item(3), toy_item(3)
    assert torch.equal(a[0].queries, b[0].queries)
    a[0].validate()
