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


#: Which of ``nn.MultiheadAttention``'s packed input projections (``in_proj_weight`` and
#: ``in_proj_bias``, three blocks of C rows) :func:`in_projection` applies.
QUERY, KEY, VALUE = 0, 1, 2


def in_projection(attn: nn.MultiheadAttention, x: torch.Tensor, which: int) -> torch.Tensor:
    """One of ``attn``'s input projections, split into heads: ``[B, L, C]`` -> ``[B, heads, L,
    C/heads]``.

    ``which``: :data:`QUERY`, :data:`KEY` or :data:`VALUE`, the rows ``which*C:(which+1)*C`` of
    ``attn.in_proj_weight`` and ``attn.in_proj_bias`` (W x + b).
    """
    heads, dim = attn.num_heads, attn.embed_dim
    weight = attn.in_proj_weight.chunk(3)[which]
    bias = attn.in_proj_bias.chunk(3)[which]
    return F.linear(x, weight, bias).unflatten(-1, (heads, dim // heads)).transpose(1, 2)


def projected_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,  # [B, heads, Lq, C/heads]
    key: torch.Tensor,  # [B, heads, S, C/heads]
    value: torch.Tensor,  # [B, heads, S, C/heads]
    blocked: torch.Tensor | None = None,  # [B, Lq, S] bool, True = may not attend
) -> torch.Tensor:
    """``attn``'s attention of already projected heads (:func:`in_projection`), then its output
    projection: ``[B, Lq, C]``.

    ``blocked`` is shared by all heads (broadcast, not copied). Every row must leave
    something to attend to (the masked-attention rule "an empty mask attends everywhere"
    guarantees it).
    """
    allowed = None if blocked is None else ~blocked[:, None]  # [B, 1, Lq, S]
    out = F.scaled_dot_product_attention(  # [B, heads, Lq, C/heads]
        query,
        key,
        value,
        attn_mask=allowed,
        dropout_p=attn.dropout if attn.training else 0.0,
    )
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def multihead_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,  # [B, Lq, C]
    key: torch.Tensor,  # [B, S, C]
    value: torch.Tensor,  # [B, S, C]
    blocked: torch.Tensor | None = None,  # [B, Lq, S] bool, True = may not attend
) -> torch.Tensor:
    """``attn(query, key, value, attn_mask=blocked repeated per head)[0]`` through
    scaled_dot_product_attention: the input projections, then :func:`projected_attention`.
    """
    return projected_attention(
        attn,
        in_projection(attn, query, QUERY),
        in_projection(attn, key, KEY),
        in_projection(attn, value, VALUE),
        blocked,
    )


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
    """Queries attend to memory (image tokens, or other queries in the association module).

    ``forward`` = :meth:`attend` on :meth:`project_query`, :meth:`project_key` and
    :meth:`project_value`, the three input projections, which the association module names
    f_q, f_k and f_v.
    """

    def project_query(
        self,
        queries: torch.Tensor,  # [B, Q, C]
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """W_q (queries + query_pos) + b_q in heads ``[B, heads, Q, C/heads]`` (the queries
        LayerNorm'd first with ``pre_norm``)."""
        return in_projection(self.attn, _with_pos(self._normed_input(queries), query_pos), QUERY)

    def project_key(
        self,
        memory: torch.Tensor,  # [B, S, C]
        memory_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """W_k (memory + memory_pos) + b_k in heads ``[B, heads, S, C/heads]``."""
        return in_projection(self.attn, _with_pos(memory, memory_pos), KEY)

    def project_value(self, memory: torch.Tensor) -> torch.Tensor:
        """W_v memory + b_v in heads ``[B, heads, S, C/heads]`` (no position term)."""
        return in_projection(self.attn, memory, VALUE)

    def attend(
        self,
        queries: torch.Tensor,  # [B, Q, C], the residual
        query: torch.Tensor,  # [B, heads, Q, C/heads], project_query
        key: torch.Tensor,  # [B, heads, S, C/heads], project_key
        value: torch.Tensor,  # [B, heads, S, C/heads], project_value
        attn_mask: torch.Tensor | None = None,  # [B, Q, S], True = may not attend
    ) -> torch.Tensor:
        """Attention of the projected heads, output projection, dropout, residual, LayerNorm."""
        return self._residual(queries, projected_attention(self.attn, query, key, value, attn_mask))

    def forward(
        self,
        queries: torch.Tensor,  # [B, Q, C]
        memory: torch.Tensor,  # [B, S, C]
        attn_mask: torch.Tensor | None = None,  # [B, Q, S], True = may not attend
        memory_pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.attend(
            queries,
            self.project_query(queries, query_pos),
            self.project_key(memory, memory_pos),
            self.project_value(memory),
            attn_mask,
        )


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
