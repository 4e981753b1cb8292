"""Batch-level decoder: decode the batch queries Q_b over all V views of an image at once.

The cross-attention memory is the tokens of every view together (``V x h_l x w_l`` per level,
view outer) with a 3-D sine position encoding (view index + y + x), so one query gathers
evidence from the full image and its crops. Each query predicts one entity score U_b^e and a
mask in every view U_b^m (its mask embedding dotted with each view's mask features). As
released, the layers, heads and level embeddings are those of the image-level decoder; a
separate :class:`MaskedAttentionDecoder` can be passed instead (config ``share_decoder``).
"""

from __future__ import annotations

import torch

from entityseg.models.heads import MaskLogits
from entityseg.models.image_decoder import DecoderPrediction, MaskedAttentionDecoder
from entityseg.models.position_encoding import sine_position_3d


def decode_batch(
    decoder: MaskedAttentionDecoder,
    batch_queries: torch.Tensor,
    features: list[torch.Tensor],
    mask_features: torch.Tensor,
    views: int,
) -> list[DecoderPrediction]:
    """Run the decoder layers on Q_b.

    Args:
        decoder: the (shared) masked-attention decoder whose layers and heads are used.
        batch_queries: Q_b ``[N, Q, C]`` from the association module.
        features: 3 maps ``[N*V, C, h_l, w_l]``, coarsest first, views of an image adjacent.
        mask_features: ``[N*V, D, h, w]``.
        views: V.
    Returns:
        ``num_layers + 1`` predictions with logits ``[N, Q, 2]`` and masks ``[N, Q, V, h, w]``.
    """
    n = batch_queries.shape[0]
    dim = decoder.hidden_dim
    memory = [
        tokens.reshape(n, views * tokens.shape[1], dim)  # [N, V*h*w, C], view outer
        for tokens in decoder.memory_tokens(features)
    ]
    positions = [
        sine_position_3d(views, *x.shape[-2:], dim // 2, x.device, x.dtype)
        .flatten(2)
        .transpose(1, 2)
        .reshape(1, -1, dim)
        for x in features
    ]
    query_pos = decoder.query_embed.weight[None].expand(n, -1, -1)
    view_features = mask_features.reshape(n, views, *mask_features.shape[1:])  # [N, V, D, h, w]
    masks = MaskLogits(view_features, [tuple(x.shape[-2:]) for x in features])
    predictions, _ = decoder.run_layers(batch_queries, query_pos, memory, positions, masks)
    return predictions
