"""The three sub-layers of a Mask2Former decoder layer: cross-attention, self-attention, FFN.

Each is a residual block with LayerNorm after (``pre_norm=False``, as released) or before the
attention. Tensors are batch-first: queries ``[B, Q, C]``, memory ``[B, S, C]``.

Attention keeps ``nn.MultiheadAttention``'s parameters (and so its checkpoint names) but runs
through ``F.scaled_dot_product_attention``, which picks fused kernels where the hardware has
them; :func:`multihead_attention` equals ``nn.MultiheadAttention.forward`` (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def multihead_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,  # [B, Lq, C]
    key: torch.Tensor,  # [B, S, C]
    value: torch.Tensor,  # [B, S, C]
    blocked: torch.Tensor | None = None,  # [B, Lq, S] bool, True = may not attend
) -> torch.Tensor:
    """``attn(query, key, value, attn_mask=blocked repeated per head)[0]`` through
    scaled_dot_product_attention.

    ``blocked`` is shared by all heads (broadcast, not copied). Every row must leave
    something to attend to (the masked-attention rule "an empty mask attends everywhere"
    guarantees it).
    """
    batch, length, dim = query.shape
    heads = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias).unflatten(-1, (heads, dim // heads)).transpose(1, 2)

    allowed = None if blocked is None else ~blocked[:, None]  # [B, 1, Lq, S]
    out = F.scaled_dot_product_attention(  # [B, heads, Lq, C/heads]
        split(query, w_q, b_q),
        split(key, w_k, b_k),
        split(value, w_v, b_v),
        attn_mask=allowed,
        dropout_p=attn.dropout if attn.training else 0.0,
    )
    return attn.out_proj(out.transpose(1, 2).flatten(2))


class _AttentionBlock(nn.Module):
    """Attention + dropout + residual, LayerNorm after (as released) or before."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def _normed_input(self, queries: torch.Tensor) -> torch.Tensor:
        return self.norm(queries) if self.pre_norm else queries

    def _residual(self, queries: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        queries = queries + self.dropout(attended)
        return queries if self.pre_norm else self.norm(queries)


class CrossAttentionLayer(_AttentionBlock):
    """Queries attend to memory (image tokens, or other queries in the association module)."""

    def forward(
        self,
        queries: torch.Tensor,  # [B, Q, C]
        memory: torch.Tensor,  # [B, S, C]
        attn_mask: torch.Tensor | None = None,  # [B, Q, S], True = may not attend
        memory_pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._normed_input(queries)
        out = multihead_attention(
            self.attn, _with_pos(x, query_pos), _with_pos(memory, memory_pos), memory, attn_mask
        )
        return self._residual(queries, out)


class SelfAttentionLayer(_AttentionBlock):
    """Queries attend to each other (reasoning about which query owns which entity)."""

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self._normed_input(queries)
        q = k = _with_pos(x, query_pos)
        return self._residual(queries, multihead_attention(self.attn, q, k, x))


class FFNLayer(nn.Module):
    """Two-layer ReLU MLP with a residual connection."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_init(self)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        x = self.norm(queries) if self.pre_norm else queries
        queries = queries + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return queries if self.pre_norm else self.norm(queries)
