"""Fixed sine position encodings of feature maps (DETR / Mask2Former style, normalised).

Positions are 1-based cumulative counts over the whole map (the release passes no padding
mask, so padded pixels count too), normalised to ``(0, 2*pi]``. Each coordinate is encoded by
``num_feats`` channels ``sin(u / d_0), cos(u / d_0), sin(u / d_1), cos(u / d_1), ...`` with
``d_j = temperature ** (2j / num_feats)``; the map's encoding is ``cat(y, x)`` on the channels.
The 3-D variant adds a per-view term so tokens of different views of one image stay apart when
the batch decoder attends over all views at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TEMPERATURE = 10000.0
SCALE = 2.0 * math.pi
EPS = 1e-6


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute in float64 when asked for it, else float32 (half is too coarse for sin/cos)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalised_positions(length: int, device, dtype: torch.dtype) -> Tensor:
    """``[length]``: counts 1..n scaled so the last one is (just under) 2*pi."""
    counts = torch.arange(1, length + 1, device=device, dtype=dtype)
    return counts / (length + EPS) * SCALE


def _sine_features(positions: Tensor, num_feats: int) -> Tensor:
    """``[...] -> [..., num_feats]``: sin on even, cos on odd channels, paired frequencies."""
    if num_feats % 2 != 0:
        raise ValueError(f"num_feats={num_feats} must be even (sin/cos pairs)")
    index = torch.arange(num_feats, device=positions.device, dtype=positions.dtype)
    dim_t = TEMPERATURE ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    phases = positions[..., None] / dim_t  # [..., num_feats]
    return torch.stack((phases[..., 0::2].sin(), phases[..., 1::2].cos()), dim=-1).flatten(-2)


def _sine_yx(height: int, width: int, num_feats: int, device, dtype: torch.dtype) -> Tensor:
    """``[2*num_feats, H, W]`` = cat(encoding of y, encoding of x), in ``dtype``."""
    pos_y = _sine_features(_normalised_positions(height, device, dtype), num_feats)  # [H, F]
    pos_x = _sine_features(_normalised_positions(width, device, dtype), num_feats)  # [W, F]
    pos_y = pos_y.T[:, :, None].expand(num_feats, height, width)
    pos_x = pos_x.T[:, None, :].expand(num_feats, height, width)
    return torch.cat((pos_y, pos_x), dim=0)


def sine_position_2d(
    height: int,
    width: int,
    num_feats: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sine encoding of an ``H x W`` map: ``[2*num_feats, H, W]`` (y channels, then x)."""
    work = _working_dtype(dtype)
    return _sine_yx(height, width, num_feats, device, work).to(dtype)


def sine_position_3d(
    views: int,
    height: int,
    width: int,
    num_feats: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sine encoding of ``V`` views of an ``H x W`` map: ``[V, 2*num_feats, H, W]``.

    The release's ``PositionEmbeddingSine3D2D`` (pos3d): the 2-D encoding plus a view term that
    encodes the view index over all ``2*num_feats`` channels (its own frequencies), constant
    over the pixels of one view.
    """
    work = _working_dtype(dtype)
    pos_yx = _sine_yx(height, width, num_feats, device, work)  # [2F, H, W]
    pos_z = _sine_features(_normalised_positions(views, device, work), 2 * num_feats)  # [V, 2F]
    return (pos_yx[None] + pos_z[:, :, None, None]).to(dtype)
