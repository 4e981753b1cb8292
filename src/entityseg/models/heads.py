"""Prediction heads: entity scores U^e and mask logits U^m from decoder queries.

The paper's U_k^e, U_k^m = PredHead_k(E_k, P_k^h), k in {i, b}. Shared by the image-level and
the batch-level decoder (as released): a LayerNorm on the query embeddings E_k, a 2-way linear
classifier (entity, no-entity) giving U^e, and a 3-layer MLP whose output is dotted with the
pixel decoder's mask features P^h giving U^m (:class:`MaskLogits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EntityHeads(nn.Module):
    """Query embeddings E -> entity logits ``[..., Q, 2]`` and mask embeddings ``[..., Q, D]``."""

    def __init__(self, hidden_dim: int, mask_dim: int, num_classes: int = 1) -> None:
        super().__init__()
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.decoder_norm(queries)
        return self.class_embed(embedding), self.mask_embed(embedding)


class MaskLogits:
    """U^m: mask embeddings dotted with mask features, at stride 4 or at an attention scale.

    Masked attention needs each query's mask at the scale of the level it attends to. Bilinear
    resizing is linear, so ``interpolate(e . F) == e . interpolate(F)`` up to float rounding:
    resizing the D-channel features once per scale and dotting them with the embeddings
    replaces resizing Q stride-4 masks after every layer, and at inference no stride-4 mask is
    made for the intermediate layers at all.

    ``features`` are ``[B, D, h, w]`` (one view per batch item) or ``[B, V, D, h, w]`` (the
    batch decoder: every view of an image); masks keep the same view layout after ``Q``.
    """

    def __init__(self, features: torch.Tensor, sizes: list[tuple[int, int]]) -> None:
        self.has_views = features.dim() == 5
        self.features = features if self.has_views else features[:, None]  # [B, V, D, h, w]
        b, v, d = self.features.shape[:3]
        flat = self.features.flatten(0, 1)
        self.resized = [
            F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(
                b, v, d, *size
            )
            for size in sizes
        ]

    def full(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, Q, D]`` -> stride-4 mask logits ``[B, Q, (V,) h, w]``."""
        return self._dot(embedding, self.features)

    def at_level(self, embedding: torch.Tensor, level: int) -> torch.Tensor:
        """``[B, Q, D]`` -> mask logits at the scale of ``level``: ``[B, Q, (V,) h_l, w_l]``."""
        return self._dot(embedding, self.resized[level])

    def _dot(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        masks = torch.einsum("bqc,bvchw->bqvhw", embedding, features)
        return masks if self.has_views else masks[:, :, 0]


def attention_mask(level_logits: torch.Tensor) -> torch.Tensor:
    """Masked attention: each query may only attend where its predicted mask is foreground.

    ``level_logits [B, Q, *views, h_l, w_l]`` are mask logits at the attention scale; positions
    with sigmoid < 0.5 are blocked (True). A query whose mask is empty everywhere attends
    everywhere. Returns bool ``[B, Q, prod(views) * h_l * w_l]`` (the token order of the
    memory: views outer, then rows, then columns), one mask for all heads: attention
    broadcasts it instead of copying it per head.
    """
    b, q = level_logits.shape[:2]
    blocked = (level_logits.reshape(b, q, -1).sigmoid() < 0.5).detach()
    # no boolean-mask indexing: it would wait for the GPU (nonzero) at every layer
    return blocked & ~blocked.all(dim=-1, keepdim=True)
