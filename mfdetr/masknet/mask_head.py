"""Instance mask heads (eq. 1/4, Table 14): per-RoI-pixel mask logits from query i and its R_i.

- :class:`DotProductHead` — ``logit = q_i · R_i[p]`` (eq. 4); when the box encoder works at D ≠ d a
  Linear d → D maps the queries first (the 32,896 params at d = 256, D = 128 that Table 4's 2.07 M
  imply). No parameters when D = d (the training-free baseline).
- :class:`SegmenterHead` — Segmenter's mask transformer head (Strudel et al. 2021) reduced to one
  query per RoI: LayerNorm on the patch tokens, bias-free linear projections of patches and query,
  L2 normalisation, a learned scale and bias on the cosine (Segmenter's ``mask_norm`` over classes
  is degenerate with one query). +33,026 params at D = 128 (Table 14: +0.03 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DotProductHead(nn.Module):
    """Dot product of (projected) queries with the RoI / image feature tokens.

    Args:
        query_dim: d; feature_dim: D.
    """

    def __init__(self, *, query_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, feature_dim) if query_dim != feature_dim else None

    def project(self, queries: Tensor) -> Tensor:
        return queries if self.query_proj is None else self.query_proj(queries)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """``queries`` [N, d], ``tokens`` [N, P, D] → logits [N, P]."""
        q = self.project(queries)
        return torch.einsum("nc,npc->np", q.to(tokens.dtype), tokens)


class SegmenterHead(nn.Module):
    """Segmenter-style head: cosine of projected, normalised patch and query embeddings, scaled.

    Args:
        query_dim: d; feature_dim: D.
        init_scale: initial value of the learned logit scale.
    """

    def __init__(self, *, query_dim: int, feature_dim: int, init_scale: float = 10.0) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, feature_dim) if query_dim != feature_dim else None
        self.decoder_norm = nn.LayerNorm(feature_dim)
        self.proj_patch = nn.Linear(feature_dim, feature_dim, bias=False)
        self.proj_classes = nn.Linear(feature_dim, feature_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.zeros(()))

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """``queries`` [N, d], ``tokens`` [N, P, D] → logits [N, P]."""
        q = queries if self.query_proj is None else self.query_proj(queries)
        patches = F.normalize(self.proj_patch(self.decoder_norm(tokens)), dim=-1)
        cls = F.normalize(self.proj_classes(q.to(tokens.dtype)), dim=-1)
        cos = torch.einsum("nc,npc->np", cls, patches)
        return cos * self.logit_scale + self.logit_bias
