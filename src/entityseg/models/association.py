"""Association module: batch queries Q_b = FFN(SAtt(XAtt(f_q(E_{I^O}), f_k(E_i), f_v(E_i)))).

The paper's association of the image-level decoder's outputs E_i into batch queries Q_b, shared
by the full image and its crops, so that one batch query stands for one entity in every view.
Each symbol has one home in :class:`AssociationModule`:

- E_i: the image decoder's final query outputs of all V views ``[N, V, Q, C]`` (before the
  heads' LayerNorm); E_{I^O} = view 0, the full image.
- f_q, f_k, f_v (:meth:`~AssociationModule.f_q`, :meth:`~AssociationModule.f_k`,
  :meth:`~AssociationModule.f_v`): as released, the input projections of the cross-attention
  (``nn.MultiheadAttention``'s packed ``in_proj_weight`` / ``in_proj_bias``, so that the
  release's weights and our checkpoints load by name), with the learnable query embedding of
  the image decoder as the position term of the query and of the keys (not of the values).
- XAtt (:meth:`~AssociationModule.xatt`): the attention of f_q over f_k, f_v, its output
  projection, residual and LayerNorm (post-norm, as released).
- SAtt: a self-attention over the batch queries, without position term; FFN: a two-layer MLP;
  both residual, post-norm (``self_attention``, ``ffn``).

Each sub-layer can be switched off (paper Table 9c): a switched-off sub-layer is the identity,
so with XAtt off Q_b starts from (and, with all three off, equals) E_{I^O}.
"""

from __future__ import annotations

import torch
from torch import nn

from entityseg.models.attention_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer


class AssociationModule(nn.Module):
    """E_i of all views ``[N, V, Q, C]`` -> batch queries Q_b ``[N, Q, C]`` (Table 9c switches).

    Args:
        hidden_dim: K, the query width C.
        num_heads, ffn_dim: of the attention and FFN sub-layers (8 and 2048 as released).
        num_layers: XAtt -> SAtt -> FFN blocks (1 as released; the paper's equation is one).
        xatt, satt, ffn: use that sub-layer (``model.net.association.{xatt,satt,ffn}``).
        pre_norm: LayerNorm before each sub-layer instead of after (post-norm as released).
    """

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
        """Q_b = FFN(SAtt(XAtt(f_q(E_{I^O}), f_k(E_i), f_v(E_i)))).

        ``view_queries`` E_i ``[N, V, Q, C]`` (view 0 = I^O), ``query_embed [Q, C]`` (the image
        decoder's query position embedding) -> Q_b ``[N, Q, C]``.
        """
        n, v, q, c = view_queries.shape
        batch_queries = view_queries[:, 0]  # E_{I^O} [N, Q, C]
        view_tokens = view_queries.reshape(n, v * q, c)  # E_i of all views, view outer
        key_pos = query_embed.repeat(v, 1)[None]  # [1, V*Q, C]: each token's query embedding
        query_pos = query_embed[None]  # [1, Q, C]
        for layer in range(self.num_layers):
            batch_queries = self.xatt(batch_queries, view_tokens, query_pos, key_pos, layer)
            batch_queries = self.self_attention[layer](batch_queries)  # SAtt (or the identity)
            batch_queries = self.ffn[layer](batch_queries)  # FFN (or the identity)
        return batch_queries

    def xatt(
        self,
        queries: torch.Tensor,
        view_tokens: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        layer: int = 0,
    ) -> torch.Tensor:
        """XAtt(f_q(queries), f_k(E_i), f_v(E_i)) of block ``layer`` with its residual and
        LayerNorm: ``[N, Q, C]`` -> ``[N, Q, C]``; ``queries`` itself when XAtt is off.

        ``queries``: E_{I^O} in the first block (the previous block's output after it);
        ``view_tokens``: E_i of all views as tokens ``[N, V*Q, C]`` (view outer);
        ``query_pos [1, Q, C]``, ``key_pos [1, V*Q, C]``: the query embedding of each query and
        of each token.
        """
        cross_attention = self.cross_attention[layer]
        if not isinstance(cross_attention, CrossAttentionLayer):  # switched off: the identity
            return queries
        return cross_attention.attend(
            queries,
            self.f_q(queries, query_pos, layer),
            self.f_k(view_tokens, key_pos, layer),
            self.f_v(view_tokens, layer),
        )

    def f_q(self, queries: torch.Tensor, query_pos: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """f_q(E_{I^O}), the query of XAtt: ``[N, Q, C]`` -> ``[N, heads, Q, C/heads]``.

        As released: W_q (E_{I^O} + query_pos) + b_q, the cross-attention's query
        in-projection (the first C rows of ``cross_attention.<layer>.attn.in_proj_weight`` and
        ``in_proj_bias``; the release's ``make_3d.enc_crosattn_3d.<layer>.multihead_attn``),
        ``query_pos [1, Q, C]`` the image decoder's query embedding.
        """
        return self._cross_attention(layer).project_query(queries, query_pos)

    def f_k(self, view_tokens: torch.Tensor, key_pos: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """f_k(E_i), the keys of XAtt: ``[N, V*Q, C]`` -> ``[N, heads, V*Q, C/heads]``.

        As released: W_k (E_i + key_pos) + b_k on the queries of all V views as tokens (view
        outer), ``key_pos [1, V*Q, C]`` each token's query embedding; the key in-projection
        is rows C..2C of ``cross_attention.<layer>.attn.in_proj_weight`` and ``in_proj_bias``.
        """
        return self._cross_attention(layer).project_key(view_tokens, key_pos)

    def f_v(self, view_tokens: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """f_v(E_i), the values of XAtt: ``[N, V*Q, C]`` -> ``[N, heads, V*Q, C/heads]``.

        As released: W_v E_i + b_v on the queries of all V views as tokens (view outer),
        without position term; the value in-projection is rows 2C..3C of
        ``cross_attention.<layer>.attn.in_proj_weight`` and ``in_proj_bias``.
        """
        return self._cross_attention(layer).project_value(view_tokens)

    def _cross_attention(self, layer: int) -> CrossAttentionLayer:
        cross_attention = self.cross_attention[layer]
        if not isinstance(cross_attention, CrossAttentionLayer):
            raise ValueError("XAtt is switched off (xatt=false): there is no f_q, f_k or f_v")
        return cross_attention
