"""The token MLP of transformer blocks: ``fc2(act(fc1(x)))`` on the last axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["gelu", "relu"]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


class FFN(nn.Module):
    """Linear(dim → hidden) → activation → Linear(hidden → dim) (parameters ``fc1``, ``fc2``).

    Swin's and FocalNet's ``Mlp`` (official key names ``mlp.fc1`` / ``mlp.fc2``) and the mask
    network's FFN are this module with GELU.
    """

    def __init__(self, *, dim: int, hidden: int, activation: Activation = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self._act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
