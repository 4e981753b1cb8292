"""Image-level decoder: Mask2Former's masked-attention transformer decoder (queries Q_i).

The paper's E_i = Phi_i(Q_i, Theta(I)) and U_i^e, U_i^m = PredHead_i(E_i, P_i^h): every view of
every image (I^O and its crops I^C) is decoded independently, the N x V views folded into the
batch. Learnable query features (Q_i) and query position embeddings go through ``num_layers``
layers of cross-attention (masked by the previous prediction, cycling over the three
pixel-decoder scales Theta(I) coarsest first) -> self-attention -> FFN, giving E_i. A prediction
(U_i^e, U_i^m; PredHead_i is :class:`~entityseg.models.heads.EntityHeads` with the pixel
decoder's mask features P_i^h) is made on the learnable queries and after every layer:
``num_layers + 1`` predictions, all deep-supervised (the L_i terms of equation (7)).
:func:`image_level_output` puts them in the ``[N, V, Q, ...]`` layout of
:class:`~entityseg.models.outputs.DecoderOutput`.

The layers, heads and level embeddings are reused by the batch-level decoder Phi_b
(``batch_decoder.py``), as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from entityseg.models.attention_layers import CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from entityseg.models.heads import EntityHeads, MaskLogits, attention_mask
from entityseg.models.outputs import DecoderOutput
from entityseg.models.position_encoding import sine_position_2d

NUM_LEVELS = 3


@dataclass
class DecoderPrediction:
    """One layer's raw prediction, as :meth:`MaskedAttentionDecoder.run_layers` makes it.

    The decoder's own batch layout ``[B, Q, ...]``: B = N x V views for the image-level decoder,
    B = N images for the batch-level one. :func:`image_level_output` and
    :func:`entityseg.models.batch_decoder.broadcast_to_views` turn it into the ``[N, V, Q, ...]``
    layout of :class:`~entityseg.models.outputs.DecoderOutput`.

    ``masks`` is None for the intermediate predictions at inference (eval mode), where only the
    final masks are used: the attention masks come from :meth:`MaskLogits.at_level`.
    """

    logits: torch.Tensor  # [B, Q, 2]
    masks: torch.Tensor | None  # [B, Q, h, w] (image level) or [B, Q, V, h, w] (batch level)


def image_level_output(predictions: list[DecoderPrediction], images: int) -> DecoderOutput:
    """The image-level decoder's predictions in the ``[N, V, Q, ...]`` layout: U_i^e, U_i^m.

    ``predictions``: the ``num_layers + 1`` predictions of :meth:`MaskedAttentionDecoder.forward`
    on N x V views (views of an image adjacent), logits ``[N*V, Q, 2]``, masks
    ``[N*V, Q, h, w]``; ``images``: N. The views are unfolded from the batch (a view, no copy).
    """

    def unfold(p: DecoderPrediction) -> DecoderOutput:
        logits = p.logits.reshape(images, -1, *p.logits.shape[1:])  # [N, V, Q, 2]
        masks = None if p.masks is None else p.masks.reshape(images, -1, *p.masks.shape[1:])
        return DecoderOutput(logits, masks)

    return DecoderOutput.from_layers([unfold(p) for p in predictions])


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former decoder over 2-D feature maps; its parts also serve the batch decoder."""

    def __init__(
        self,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # Q_i
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # query position embedding
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim else nn.Identity()
            for _ in range(NUM_LEVELS)
        )
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, dropout, pre_norm) for _ in range(num_layers)
        )
        self.self_attention = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, dropout, pre_norm) for _ in range(num_layers)
        )
        self.ffn = nn.ModuleList(
            FFNLayer(hidden_dim, ffn_dim, dropout, pre_norm) for _ in range(num_layers)
        )
        self.heads = EntityHeads(hidden_dim, mask_dim)

    def memory_tokens(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level: projected features + level embedding as tokens ``[B, h*w, C]``."""
        return [
            (proj(x).flatten(2) + embed[None, :, None]).transpose(1, 2)
            for proj, x, embed in zip(
                self.input_proj, features, self.level_embed.weight, strict=True
            )
        ]

    def forward(
        self, features: list[torch.Tensor], mask_features: torch.Tensor
    ) -> tuple[list[DecoderPrediction], torch.Tensor]:
        """Decode 2-D views.

        Args:
            features: 3 maps ``[B, C, h_l, w_l]``, coarsest first (B = N x V views).
            mask_features: ``[B, D, h, w]`` at stride 4.
        Returns:
            the ``num_layers + 1`` predictions, and the final query outputs E_i ``[B, Q, C]``
            (before the heads' LayerNorm), which the association module reads.
        """
        batch = mask_features.shape[0]
        memory = self.memory_tokens(features)
        positions = [
            sine_position_2d(*x.shape[-2:], self.hidden_dim // 2, x.device, x.dtype)
            .flatten(1)
            .T[None]
            for x in features
        ]
        queries = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)

        sizes = [tuple(x.shape[-2:]) for x in features]
        masks = MaskLogits(mask_features, sizes)
        return self.run_layers(queries, query_pos, memory, positions, masks)

    def run_layers(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: list[torch.Tensor],
        positions: list[torch.Tensor],
        masks: MaskLogits,
    ) -> tuple[list[DecoderPrediction], torch.Tensor]:
        """The shared loop: predict, then per layer: mask -> cross -> self -> FFN -> predict.

        The attention mask of layer i comes from the previous prediction at the scale of level
        ``i % 3``. Stride-4 masks are made for every prediction in training (deep supervision)
        and only for the final one in eval mode.
        """
        predictions = []
        for i in range(self.num_layers + 1):
            logits, embedding = self.heads(queries)
            final = i == self.num_layers
            full = masks.full(embedding) if self.training or final else None
            predictions.append(DecoderPrediction(logits, full))
            if final:
                break
            level = i % NUM_LEVELS
            blocked = attention_mask(masks.at_level(embedding, level))
            queries = self.cross_attention[i](
                queries, memory[level], blocked, positions[level], query_pos
            )
            queries = self.self_attention[i](queries, query_pos)
            queries = self.ffn[i](queries)
        return predictions, queries
