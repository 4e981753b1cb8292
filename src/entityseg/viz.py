"""Pictures of entities: coloured overlays with outlines, crop boxes, side-by-side panels.

Everything goes through an entity-id map (``0`` = no entity, ``k`` = entity k), which is how
a 4000 x 3000 photo with a hundred entities can be drawn without a mask per entity in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils


def entity_colors(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct-looking RGB colours uint8 ``[count, 3]`` (golden-ratio hues)."""
    if count == 0:
        return np.zeros((0, 3), np.uint8)
    hues = (np.arange(count) * 0.618033988749895 + seed * 0.1) % 1.0
    values = 255 - 55 * (np.arange(count) % 2)  # alternate brightness for neighbours in hue
    hsv = np.stack([hues * 179, np.full(count, 200), values], axis=1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def id_map_from_masks(masks: Iterable[np.ndarray], height: int, width: int) -> np.ndarray:
    """Paint binary masks in order into a uint16 id map (later masks win where they overlap)."""
    id_map = np.zeros((height, width), dtype=np.uint16)
    for k, mask in enumerate(masks, start=1):
        id_map[np.asarray(mask, dtype=bool)] = k
    return id_map


def id_map_from_rles(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Entity-id map of COCO RLE masks, decoding one mask at a time."""
    return id_map_from_masks((mask_utils.decode(r) for r in rles), height, width)


def overlay_id_map(
    image: np.ndarray,
    id_map: np.ndarray,
    alpha: float = 0.55,
    color_indices: np.ndarray | None = None,
) -> np.ndarray:
    """Blend each entity of an id map over an RGB image in its own colour, outlines in white.

    Entity k (id k + 1) takes colour k of :func:`entity_colors`, or colour
    ``color_indices[k]``: two pictures of one image colour the same entity alike
    (:func:`~entityseg.inference.compare.matched_colors`)."""
    count = int(id_map.max())
    if color_indices is None:
        palette = entity_colors(count)
    else:
        indices = np.asarray(color_indices[:count], dtype=np.int64)
        palette = entity_colors(int(indices.max()) + 1 if count else 0)[indices]
    colors = np.concatenate([np.zeros((1, 3), np.uint8), palette])
    painted = colors[id_map].astype(np.float32)
    covered = (id_map > 0)[..., None]
    out = np.where(covered, (1 - alpha) * image + alpha * painted, image).astype(np.uint8)
    out[entity_edges(id_map)] = 255
    return out


def entity_edges(id_map: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels whose left or upper neighbour has another id (the outlines)."""
    edges = np.zeros(id_map.shape, dtype=bool)
    edges[:, 1:] |= id_map[:, 1:] != id_map[:, :-1]
    edges[1:, :] |= id_map[1:, :] != id_map[:-1, :]
    return edges


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """:func:`overlay_id_map` of binary masks ``[M, H, W]`` painted in order."""
    return overlay_id_map(image, id_map_from_masks(masks, *image.shape[:2]), alpha)


#: One colour per crop (RGB), so overlapping crops read as separate rectangles, not a grid.
CROP_COLORS = [
    (255, 64, 0),
    (0, 160, 255),
    (255, 210, 0),
    (200, 0, 255),
    (0, 220, 120),
    (255, 0, 140),
    (140, 90, 0),
    (0, 90, 200),
]


def draw_boxes(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Draw ``(x0, y0, x1, y1)`` boxes (e.g. the crops I^C) on a copy of an RGB image: thin,
    each in its own colour of :data:`CROP_COLORS` (or all in ``color``) and each inset by its
    rank, so the four overlapping fixed crops show as four rectangles rather than the nine
    tiles their thick edges would draw."""
    out = np.ascontiguousarray(image).copy()
    thickness = max(1, round(min(out.shape[:2]) / 500))
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        inset = k % 4 * thickness  # crops sharing an edge of the image stay apart
        cv2.rectangle(
            out,
            (int(x0) + inset, int(y0) + inset),
            (int(x1) - 1 - inset, int(y1) - 1 - inset),
            color or CROP_COLORS[k % len(CROP_COLORS)],
            thickness,
        )
    return out


def labelled(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` with ``text`` written in its top-left corner."""
    out = np.ascontiguousarray(image).copy()
    scale = max(0.4, min(out.shape[:2]) / 500)
    thickness = max(1, round(scale * 2))
    cv2.putText(
        out, text, (6, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2
    )
    cv2.putText(
        out, text, (6, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness
    )
    return out


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Panels of the same height next to each other, separated by white gaps."""
    height = max(p.shape[0] for p in panels)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    return np.concatenate([x for p in padded for x in (p, spacer)][:-1], axis=1)


def image_grid(tiles: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tiles (e.g. one per validation image) in rows of ``columns`` (for TensorBoard)."""
    rows = [side_by_side(tiles[i : i + columns], gap) for i in range(0, len(tiles), columns)]
    width = max(r.shape[1] for r in rows)
    rows = [
        np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows
    ]
    return np.concatenate(rows, axis=0)


def compare_modes(
    image: np.ndarray, entities_by_mode: dict, crop_boxes: Sequence[Sequence[float]]
) -> np.ndarray:
    """Side by side: the image with its crops I^C drawn, then each mode's entities (labelled),
    an entity matched to one of the first mode's (IoU matching,
    :func:`~entityseg.inference.compare.compare_entities`) in that entity's colour.

    ``entities_by_mode`` maps a mode name (e.g. ``image_o``, ``batch_oc``) to its
    :class:`~entityseg.inference.fusion.Entities`; ``crop_boxes`` are the crops in pixels.
    """
    from entityseg.inference.compare import compare_entities, matched_colors

    height, width = image.shape[:2]
    panels = [labelled(draw_boxes(image, crop_boxes), "crops")]
    baseline = next(iter(entities_by_mode.values()), None)
    for mode, entities in entities_by_mode.items():
        id_map = id_map_from_rles(entities.rles, height, width)
        colors = None
        if entities is not baseline:
            comparison = compare_entities(entities, baseline)
            colors = matched_colors(comparison, len(entities), len(baseline))
        picture = overlay_id_map(image, id_map, color_indices=colors)
        panels.append(labelled(picture, f"{mode}: {len(entities)}"))
    return side_by_side(panels)


def highlight_entities(
    image: np.ndarray, id_map: np.ndarray, highlighted: Iterable[int], alpha: float = 0.55
) -> np.ndarray:
    """The entities ``highlighted`` (ids of ``id_map``) coloured as :func:`overlay_id_map`
    colours them and ringed in yellow; every other entity is only outlined in grey, so what is
    highlighted (e.g. what the crops recovered) stands out."""
    chosen = np.zeros(int(id_map.max()) + 1, dtype=bool)
    chosen[[k for k in highlighted if 0 < k < len(chosen)]] = True
    shown = np.where(chosen[id_map], id_map, 0).astype(id_map.dtype)
    out = overlay_id_map(image, shown, alpha)
    out[entity_edges(id_map) & (shown == 0)] = (160, 160, 160)  # the others' outlines
    contours, _ = cv2.findContours(
        (shown > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    thickness = max(2, round(min(out.shape[:2]) / 250))
    cv2.drawContours(out, contours, -1, (255, 220, 0), thickness)
    return out


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (area interpolation) so that its longer side is at most ``max_side``:
    a picture to show on a page; the full-size one is the download."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
