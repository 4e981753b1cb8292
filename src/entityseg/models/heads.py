"""Prediction heads: entity scores U^e and mask logits U^m from decoder queries.

Shared by the image-level and the batch-level decoder (as released): a LayerNorm on the query
embeddings, a 2-way linear classifier (entity, no-entity) and a 3-layer MLP whose output is
dotted with the pixel decoder's mask features.
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


def attention_mask(
    mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int
) -> torch.Tensor:
    """Masked attention: each query may only attend where its predicted mask is foreground.

    ``mask_logits [B, Q, *views, h, w]`` are resized bilinearly to the attention scale ``size``;
    positions with sigmoid < 0.5 are blocked (True). A query whose mask is empty everywhere
    attends everywhere. Returns bool ``[B * heads, Q, prod(views) * size]`` (the token order of
    the memory: views outer, then rows, then columns).
    """
    b, q = mask_logits.shape[:2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:])
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    blocked = (resized.reshape(b, q, -1).sigmoid() < 0.5).detach()
    blocked[blocked.all(dim=-1)] = False
    return blocked.repeat_interleave(num_heads, dim=0)
