"""Point sampling of mask logits and targets (PointRend / Mask2Former style).

Mask losses and matching costs are computed on a few thousand points instead of full masks.
Points are normalised (x, y) in [0, 1], so one set of points reads a stride-4 prediction and
its full-resolution target at the same image locations. :func:`dense_points` is the
deterministic alternative (``model.criterion.num_points: null``): every prediction pixel's
centre, what the release's one-step reference uses and what small models can afford.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps`` [B, C, H, W] at ``points`` [B, P, 2] -> [B, C, P].

    ``points`` are (x, y) in [0, 1] with pixel centres at (j + 0.5) / W (``align_corners=False``).
    """
    grid = 2.0 * points.to(maps.dtype).unsqueeze(2) - 1.0  # [B, P, 1, 2] in [-1, 1]
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=False).squeeze(3)


def dense_points(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """The centre of every pixel of a ``height`` x ``width`` map, row by row -> [h*w, 2].

    Point ``i * width + j`` is ``((j + 0.5) / width, (i + 0.5) / height)``: read from the
    prediction it is the logit itself; read from a 4x larger target it is the mean of the
    2 x 2 target pixels around that centre (fractional at mask borders).
    """
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


@torch.no_grad()
def uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """Points where each mask is least certain, plus uniform ones -> [B, num_points, 2].

    Mask2Former's importance sampling: draw ``oversample_ratio * num_points`` uniform candidates
    per mask, keep the ``importance_sample_ratio * num_points`` with the largest uncertainty
    ``-|logit|`` (near the predicted boundary), and fill the rest with fresh uniform points.
    ``logits``: [B, 1, H, W] or [B, H, W] mask logits.
    """
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    batch = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(num_points * importance_sample_ratio)
    num_random = num_points - num_uncertain
    candidates = torch.rand(batch, num_candidates, 2, device=logits.device)  # [B, P', 2]
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # [B, P']
    top = uncertainty.topk(num_uncertain, dim=1).indices  # [B, P_u]
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))  # [B, P_u, 2]
    uniform = torch.rand(batch, num_random, 2, device=logits.device)  # [B, P - P_u, 2]
    return torch.cat([chosen, uniform], dim=1)
