"""Query feature encoder (sec. 3.4, eq. 10-11, Table 5): adapts the frozen detector's queries.

Sub-blocks, each optional, applied in transformer-decoder order with residual + post-LayerNorm:

1. O2O, object-to-object self-attention across the K queries of one image (eq. 10);
2. B2O, box-to-object cross-attention: query i attends to the S·S tokens of its own R_i (eq. 11);
3. FFN, Linear(d → 2d) → GELU → Linear(2d → d).

The attention modules project q, k and v and have no output projection. This is what Table 5's
#params▲ imply at d = 256, D = 128: FFN 263,424 (0.26 M; 2.07 → 2.33), O2O 3·65,792 + 512 =
197,888 (0.20 M; FFN+O2O 2.53), B2O 65,792 + 2·33,024 + 512 = 132,352 (0.13 M; FFN+B2O 2.46), and
B2O's k/v projections from D = 128 to 256 on 100·32·32 RoI tokens cost 6.7 GMACs (Table 5: +6.8 G).
"""

from __future__ import annotations

from torch import Tensor, nn

from mfdetr.layers import FFN
from mfdetr.masknet.blocks import Attention


class QueryEncoder(nn.Module):
    """O2O → B2O → FFN on the queries (each part optional).

    Args:
        dim: query width d.
        roi_dim: width D of the RoI tokens (keys/values of B2O).
        o2o, b2o, ffn: which parts exist.
        heads: attention heads.
        ffn_hidden: FFN hidden width.
    """

    def __init__(
        self, *, dim: int, roi_dim: int, o2o: bool, b2o: bool, ffn: bool, heads: int = 8, ffn_hidden: int = 512
    ) -> None:
        super().__init__()
        self.o2o = Attention(q_dim=dim, kv_dim=dim, heads=heads) if o2o else None
        self.o2o_norm = nn.LayerNorm(dim) if o2o else None
        self.b2o = Attention(q_dim=dim, kv_dim=roi_dim, heads=heads) if b2o else None
        self.b2o_norm = nn.LayerNorm(dim) if b2o else None
        self.ffn = FFN(dim=dim, hidden=ffn_hidden) if ffn else None
        self.ffn_norm = nn.LayerNorm(dim) if ffn else None

    @property
    def empty(self) -> bool:
        return self.o2o is None and self.b2o is None and self.ffn is None

    def forward(self, queries: Tensor, rois: Tensor | None, *, fold: bool = False) -> Tensor:
        """``queries`` [B, K, d]; ``rois`` [B·K, S·S, D] (needed for B2O) → [B, K, d]. ``fold``: B2O projects
        its query instead of the S·S tokens (:meth:`Attention.forward`; same result)."""
        q = queries
        if self.o2o is not None and self.o2o_norm is not None:
            q = self.o2o_norm(q + self.o2o(q, q))
        if self.b2o is not None and self.b2o_norm is not None:
            if rois is None:
                raise ValueError("box-to-object attention needs the RoI features")
            b, k, d = q.shape
            qi = q.reshape(b * k, 1, d)
            q = self.b2o_norm(qi + self.b2o(qi, rois.to(qi.dtype), fold=fold)).view(b, k, d)
        if self.ffn is not None and self.ffn_norm is not None:
            q = self.ffn_norm(q + self.ffn(q))
        return q
