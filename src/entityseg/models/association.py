"""Association module: batch queries Q_b = FFN(SAtt(XAtt(f_q(E_{I^O}), f_k(E_i), f_v(E_i)))).

Q_b is shared by the full image and its crops, so that one batch query stands for one entity in
every view. As released, the cross-attention's query is the image decoder's final output E_i for
the full-image view I^O (with the learnable query embedding as its position), its keys and
values are the final outputs of all V views (keys with the same query embedding), then comes a
self-attention without position term, then an FFN; post-norm.

Each sub-layer can be switched off (paper Table 9c): a switched-off sub-layer is the identity,
so with XAtt off Q_b starts from (and, with all three off, equals) E_{I^O}.
"""

from __future__ import annotations

import torch
from torch import nn

from entityseg.models.attention_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer


class AssociationModule(nn.Module):
    """E_i of all views ``[N, V, Q, C]`` -> batch queries Q_b ``[N, Q, C]``."""

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 1,
        xatt: bool = True,
        satt: bool = True,
        ffn: bool = True,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, pre_norm=pre_norm) if xatt else nn.Identity()
            for _ in range(num_layers)
        )
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, pre_norm=pre_norm) if satt else nn.Identity()
            for _ in range(num_layers)
        )
        self.ffn = nn.ModuleList(
            FFNLayer(hidden_dim, ffn_dim, pre_norm=pre_norm) if ffn else nn.Identity()
            for _ in range(num_layers)
        )

    def forward(self, view_queries: torch.Tensor, query_embed: torch.Tensor) -> torch.Tensor:
        """``view_queries [N, V, Q, C]`` (view 0 = I^O), ``query_embed [Q, C]`` -> ``[N, Q, C]``."""
        n, v, q, c = view_queries.shape
        batch_queries = view_queries[:, 0]  # f_q(E_{I^O})
        keys = view_queries.reshape(n, v * q, c)  # all views' queries
        key_pos = query_embed.repeat(v, 1)[None]  # [1, V*Q, C]
        query_pos = query_embed[None]
        for xatt, satt, ffn in zip(
            self.cross_attention, self.self_attention, self.ffn, strict=True
        ):
            if isinstance(xatt, CrossAttentionLayer):
                batch_queries = xatt(batch_queries, keys, None, key_pos, query_pos)
            if isinstance(satt, SelfAttentionLayer):
                batch_queries = satt(batch_queries)
            batch_queries = ffn(batch_queries)
        return batch_queries
