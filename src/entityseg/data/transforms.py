"""Image-level transforms shared by training, evaluation and prediction.

The release resizes by the shortest edge (sampled from 640..800 at train time, 800 at test)
with the long edge capped at 1333, flips the full image and its crop together, and normalises
with the backbone's pixel mean and std before zero-padding to a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: ImageNet statistics in 0..255 RGB, the release's PIXEL_MEAN / PIXEL_STD.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) that brings the short side to ``short``, the long side to at most ``max_size``.

    Same arithmetic as detectron2's ``ResizeShortestEdge`` (round half up at the end), except
    that no side becomes 0: a thin strip (6 x 2000 to at most 160) keeps one pixel.
    """
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def scaled_sizes(sizes: Sequence[int], scale: float) -> list[int]:
    """The recipe's resize sizes times ``scale`` (for small runs), at least 32 pixels."""
    return [max(32, int(round(s * scale))) for s in sizes]


def flip_box(box: Sequence[int], width: int) -> tuple[int, int, int, int]:
    """The same pixels' box after a horizontal flip of an image ``width`` wide."""
    x0, y0, x1, y1 = box
    return width - x1, y0, width - x0, y1


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` -> float ``[3, H, W]``, ``(x - mean) / std`` per channel."""
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def denormalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`normalize`, for pictures: float ``[3, H, W]`` -> uint8 ``[H, W, 3]``."""
    mean_t = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    image = (tensor * std_t + mean_t).clamp(0, 255).round().byte()
    return image.permute(1, 2, 0).cpu().numpy()
