"""Batch-level decoder: decode the batch queries Q_b over all V views of an image at once.

The paper's E_b = Phi_b(Q_b, Theta(I)), with Q_b, E_b in R^{N x 1 x 1 x 1 x K} (one set of
queries per image, shared by the full image I^O and its crops I^C), then E_b broadcast to every
view (R^{N x V x 1 x 1 x K}) and U_b^e, U_b^m = PredHead_b(E_b, P_b^h), so that one batch query
stands for one entity in every view.

Phi_b: the cross-attention memory is the tokens of every view together (``V x h_l x w_l`` per
level, view outer) with a 3-D sine position encoding (view index + y + x), so one query gathers
evidence from the full image and its crops. As released, the layers, heads and level embeddings
are those of the image-level decoder; a separate :class:`MaskedAttentionDecoder` can be passed
instead (config ``share_decoder``).

The broadcast and PredHead_b (:func:`broadcast_to_views`): the heads see each query once; its
entity score U_b^e is the same in every view and its mask embedding is dotted with every view's
mask features P_b^h, a mask U_b^m per view.
"""

from __future__ import annotations

import torch

from entityseg.models.heads import MaskLogits
from entityseg.models.image_decoder import DecoderPrediction, MaskedAttentionDecoder
from entityseg.models.outputs import DecoderOutput
from entityseg.models.position_encoding import sine_position_3d


def decode_batch(
    decoder: MaskedAttentionDecoder,
    batch_queries: torch.Tensor,
    features: list[torch.Tensor],
    mask_features: torch.Tensor,
    views: int,
) -> DecoderOutput:
    """Phi_b and PredHead_b: the decoder layers on Q_b over all views, predictions per view.

    Args:
        decoder: the (shared) masked-attention decoder whose layers and heads are used.
        batch_queries: Q_b ``[N, Q, C]`` from the association module.
        features: 3 maps ``[N*V, C, h_l, w_l]``, coarsest first, views of an image adjacent.
        mask_features: P_b^h, ``[N*V, D, h, w]``.
        views: V.
    Returns:
        U_b^e ``[N, V, Q, 2]`` and U_b^m ``[N, V, Q, h, w]`` of the ``num_layers + 1``
        predictions (:func:`broadcast_to_views`), the earlier ones as ``aux``.
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
    # PredHead_b's mask head: each query's mask embedding dotted with every view's features
    masks = MaskLogits(view_features, [tuple(x.shape[-2:]) for x in features])
    predictions, _ = decoder.run_layers(batch_queries, query_pos, memory, positions, masks)
    return DecoderOutput.from_layers([broadcast_to_views(p, views) for p in predictions])


def broadcast_to_views(prediction: DecoderPrediction, views: int) -> DecoderOutput:
    """One batch-level prediction, E_b broadcast to every view, in the ``[N, V, Q, ...]`` layout.

    The paper broadcasts E_b ``[N, 1, Q, K]`` to the V views before PredHead_b. The heads
    see each query once (``logits [N, Q, 2]``, the mask embedding dotted with all V views'
    mask features: ``masks [N, Q, V, h, w]``, :class:`~entityseg.models.heads.MaskLogits`),
    which is the same: here the entity score U_b^e is repeated for every view (an ``expand``,
    no copy) and U_b^m's view axis is moved ahead of the queries (a transposed view).
    """
    logits = prediction.logits[:, None].expand(-1, views, -1, -1)  # [N, V, Q, 2]
    masks = None if prediction.masks is None else prediction.masks.transpose(1, 2)
    return DecoderOutput(logits, masks)
