"""Pictures of entities: coloured mask overlays and crop boxes (TensorBoard, notebook, demo)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def entity_colors(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct-looking RGB colours uint8 ``[count, 3]`` (golden-ratio hues)."""
    hues = (np.arange(count) * 0.618033988749895 + seed * 0.1) % 1.0
    hsv = np.stack([hues * 179, np.full(count, 200), np.full(count, 255)], axis=1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend each mask ``[M, H, W]`` over an RGB image ``[H, W, 3]`` in its own colour.

    Later masks are painted over earlier ones; entity outlines are drawn in white.
    """
    out = image.astype(np.float32).copy()
    colors = entity_colors(len(masks))
    for mask, color in zip(masks.astype(bool), colors, strict=True):
        out[mask] = (1 - alpha) * out[mask] + alpha * color
    out = out.astype(np.uint8)
    for mask in masks.astype(np.uint8):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out


def draw_boxes(
    image: np.ndarray, boxes: Sequence[Sequence[float]], color: tuple[int, int, int] = (255, 64, 0)
) -> np.ndarray:
    """Draw ``(x0, y0, x1, y1)`` boxes (e.g. the crops I^C) on a copy of an RGB image."""
    out = np.ascontiguousarray(image).copy()
    thickness = max(1, round(min(out.shape[:2]) / 200))
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1) - 1, int(y1) - 1), color, thickness)
    return out
