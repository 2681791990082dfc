"""Small layers shared by the DETR families."""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between (official ``MLP``; keys ``layers.{i}``)."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def clones(module: nn.Module, n: int, *, shared: bool = False) -> nn.ModuleList:
    """``n`` deep copies of ``module`` (or ``n`` references to it when ``shared``: one tensor, n keys)."""
    return nn.ModuleList([module if shared else copy.deepcopy(module) for _ in range(n)])
