"""Deterministic synthetic high-resolution scenes for fine-grained entity segmentation.

Every quick run and test of this library trains and evaluates on these scenes, so nothing has
to be downloaded. They imitate the EntitySeg dataset in miniature: class-agnostic entities of
very different sizes that tile the whole frame. Each scene is painted back to front:

1. "Stuff": two to four large regions (wavy horizontal bands or a warped Voronoi partition)
   that together cover the frame, each filled with its own textured palette.
2. Medium "things": ellipses, rotated rectangles, irregular polygons and rings of roughly
   5-25 % of the short side, textured and partly occluding each other.
3. Many small and thin entities: specks of 2-4 px, blobs of 4-30 px, and strokes or branches
   1-4 px wide and 8-300 px long (cables, twigs, blades of grass).

The small entities are the point of the data set. About half of them are below ~12 px, many
only a few pixels, so they vanish when the 1024x768 image is downscaled to a network input of
~200 px short side, yet more of them survive in a 0.7x crop resized to the same size. That is
the gap CropFormer closes by combining the full image with high-resolution crops.

The entity id map is painted alongside the colour image with the same geometry, so occlusion
is exact. Entities left with fewer than ``MIN_ENTITY_AREA`` visible pixels are merged into the
neighbour that surrounds them; an entity cut into several pieces stays one entity. Every pixel
belongs to exactly one entity. Annotations are written in COCO instance format with compressed
RLE masks, and the output is byte-identical for the same arguments.

Usage::

    python -m entityseg.data.synthetic --out data/synthetic --num-images 8 --seed 0
"""

import argparse
import colorsys
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from entityseg.data.coco_entity import ENTITY_CATEGORY, mask_to_annotation

MIN_ENTITY_AREA = 4
MIN_IMAGE_SIDE = 64
IMAGES_DIRNAME = "images"
ANNOTATIONS_FILENAME = "annotations.json"

# cv2 draws polygons with fixed-point coordinates: this many fractional bits give sub-pixel
# placement, so tiny shapes differ in outline instead of snapping to the same few pixels.
_SUBPIXEL_BITS = 4
_SUBPIXEL_SCALE = 1 << _SUBPIXEL_BITS

# Share of the small entities that are specks, blobs, strokes and branched strokes.
_SMALL_KIND_PROBABILITIES = {"speck": 0.4, "blob": 0.2, "stroke": 0.25, "branch": 0.15}
_STROKE_THICKNESSES = np.array([1, 2, 3, 4])
_STROKE_THICKNESS_PROBABILITIES = np.array([0.35, 0.3, 0.2, 0.15])


@dataclass(frozen=True)
class _Stamp:
    """A binary shape rasterised inside its own bounding box, placed at (top, left)."""

    mask: np.ndarray  # bool [h, w]
    top: int
    left: int

    def window(self) -> tuple[slice, slice]:
        """The image rows and columns that the stamp's box covers."""
        height, width = self.mask.shape
        return slice(self.top, self.top + height), slice(self.left, self.left + width)


class _Canvas:
    """The colour image and the entity id map that are painted together, back to front."""

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width
        self.image = np.zeros((height, width, 3), np.float32)
        self.id_map = np.zeros((height, width), np.int32)
        self.next_id = 1

    def colour_under(self, stamp: _Stamp) -> np.ndarray:
        """Mean colour that the stamp is about to cover, to pick a colour that stands out."""
        rows, cols = stamp.window()
        return self.image[rows, cols][stamp.mask].mean(axis=0)

    def paint(self, stamp: _Stamp, texture: np.ndarray) -> int:
        """Paint a new entity over whatever lies beneath it and return its id."""
        entity_id = self.next_id
        self.next_id += 1
        rows, cols = stamp.window()
        self.id_map[rows, cols][stamp.mask] = entity_id
        self.image[rows, cols][stamp.mask] = texture[stamp.mask]
        return entity_id


# ----------------------------------------------------------------------------- colours


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255], neither washed out nor black."""
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.25, 1.0), rng.uniform(0.2, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255.0


def _pick_distinct_colour(
    rng: np.random.Generator, avoid: np.ndarray, num_candidates: int = 12
) -> np.ndarray:
    """The candidate colour farthest from all colours in `avoid` [N, 3], so neighbours differ."""
    candidates = np.stack([_random_colour(rng) for _ in range(num_candidates)])
    if len(avoid) == 0:
        return candidates[0]
    distances = np.linalg.norm(candidates[:, None, :] - avoid[None, :, :], axis=-1)
    return candidates[int(np.argmax(distances.min(axis=1)))]


def _palette_partner(rng: np.random.Generator, base: np.ndarray, spread: float) -> np.ndarray:
    """A second colour close to `base`: the two span one entity's texture palette."""
    return np.clip(base + rng.uniform(-spread, spread, 3), 0.0, 255.0).astype(np.float32)


# ----------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Gaussian noise with a correlation length of about `cell` pixels, roughly unit scale."""
    cell = max(1, cell)
    rows, cols = height // cell + 2, width // cell + 2
    coarse = rng.standard_normal((rows, cols)).astype(np.float32)
    fine = cv2.resize(coarse, (cols * cell, rows * cell), interpolation=cv2.INTER_CUBIC)
    return fine[:height, :width]


def _rotated_coordinates(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates along and across a random direction, for oriented patterns."""
    angle = rng.uniform(0.0, np.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    along = xs * np.cos(angle) + ys * np.sin(angle)
    across = -xs * np.sin(angle) + ys * np.cos(angle)
    return along, across


def _noise_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blotchy weights in [0, 1], like foliage, rock or clouds."""
    cell = int(rng.uniform(3.0, max(4.0, min(height, width) / 3.0)))
    return 0.5 + 0.5 * np.tanh(_smooth_noise(rng, height, width, cell))


def _stripe_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Soft parallel stripes in [0, 1], like planks, fabric or fences."""
    along, _ = _rotated_coordinates(rng, height, width)
    period = rng.uniform(4.0, 32.0)
    return 0.5 + 0.5 * np.sin(along * (2.0 * np.pi / period))


def _gradient_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear ramp in [0, 1], like shading or a sky."""
    along, _ = _rotated_coordinates(rng, height, width)
    span = float(along.max() - along.min())
    return (along - along.min()) / max(span, 1.0)


def _checker_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A rotated checkerboard of 0 and 1, like tiles or windows."""
    along, across = _rotated_coordinates(rng, height, width)
    cell = rng.uniform(3.0, 24.0)
    parity = (np.floor(along / cell) + np.floor(across / cell)) % 2.0
    return parity.astype(np.float32)


_PATTERNS = (_noise_pattern, _stripe_pattern, _gradient_pattern, _checker_pattern)


def _texture(
    rng: np.random.Generator, height: int, width: int, base: np.ndarray, spread: float
) -> np.ndarray:
    """An RGB texture [h, w, 3] that blends `base` with a nearby colour through a pattern."""
    pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))](rng, height, width)
    partner = _palette_partner(rng, base, spread)
    texture = base + (partner - base) * pattern[..., None]
    grain = _smooth_noise(rng, height, width, cell=2) * (spread * 0.1)
    return texture + grain[..., None]


# ----------------------------------------------------------------------------- geometry


def _ellipse_points(
    centre: np.ndarray, radii: tuple[float, float], angle: float, num_points: int
) -> np.ndarray:
    """Outline of a rotated ellipse as float [N, 2] (x, y) points."""
    theta = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    local = np.stack([radii[0] * np.cos(theta), radii[1] * np.sin(theta)], axis=1)
    return centre + local @ _rotation(angle).T


def _rotation(angle: float) -> np.ndarray:
    """2x2 rotation matrix for (x, y) column vectors."""
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def _outline_points(radius: float) -> int:
    """Enough polygon vertices for a smooth outline of this radius, few for tiny shapes."""
    return int(np.clip(2.0 * np.pi * radius / 4.0, 8, 64))


def _irregular_polygon_points(
    rng: np.random.Generator, centre: np.ndarray, radius: float, num_vertices: int, jitter: float
) -> np.ndarray:
    """A star-shaped polygon whose vertex radii vary by up to `jitter` of `radius`."""
    theta = np.sort(rng.uniform(0.0, 2.0 * np.pi, num_vertices))
    radii = radius * (1.0 - jitter * rng.uniform(0.0, 1.0, num_vertices))
    return centre + np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)


def _random_walk_points(
    rng: np.random.Generator, start: np.ndarray, length: float, num_segments: int
) -> np.ndarray:
    """A gently bending polyline of about `length` pixels, like a cable or a twig."""
    heading = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(rng.normal(0.0, 0.35, num_segments))
    steps = (length / num_segments) * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return np.concatenate([start[None, :], start + np.cumsum(steps, axis=0)])


def _bounding_window(
    points: list[np.ndarray], margin: float, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Integer (top, left, bottom, right) box around the points, clipped; None if outside."""
    stacked = np.concatenate(points)
    left = max(0, int(np.floor(stacked[:, 0].min() - margin)))
    top = max(0, int(np.floor(stacked[:, 1].min() - margin)))
    right = min(width, int(np.ceil(stacked[:, 0].max() + margin)) + 1)
    bottom = min(height, int(np.ceil(stacked[:, 1].max() + margin)) + 1)
    if right <= left or bottom <= top:
        return None
    return top, left, bottom, right


def _to_fixed_point(points: np.ndarray, top: int, left: int) -> np.ndarray:
    """Float image points to cv2's fixed-point int32 coordinates relative to the box."""
    local = (points - np.array([left, top])) * _SUBPIXEL_SCALE
    return np.round(local).astype(np.int32)


def _stamp_from_local(local: np.ndarray, top: int, left: int) -> _Stamp | None:
    """Wrap a drawn local canvas as a stamp; None if nothing of it is inside the image."""
    mask = local.astype(bool)
    if not mask.any():
        return None
    return _Stamp(mask=mask, top=top, left=left)


def _stamp_polygons(
    polygons: list[np.ndarray], height: int, width: int, holes: list[np.ndarray] | None = None
) -> _Stamp | None:
    """Rasterise filled polygons (minus optional holes) clipped to the image."""
    window = _bounding_window(polygons, 1.0, height, width)
    if window is None:
        return None
    top, left, bottom, right = window
    local = np.zeros((bottom - top, right - left), np.uint8)
    fixed = [_to_fixed_point(polygon, top, left) for polygon in polygons]
    cv2.fillPoly(local, fixed, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    if holes:
        fixed_holes = [_to_fixed_point(hole, top, left) for hole in holes]
        cv2.fillPoly(local, fixed_holes, 0, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return _stamp_from_local(local, top, left)


def _stamp_polylines(
    lines: list[np.ndarray], thicknesses: list[int], height: int, width: int
) -> _Stamp | None:
    """Rasterise open polylines, each with its own stroke width, clipped to the image."""
    window = _bounding_window(lines, max(thicknesses) + 1.0, height, width)
    if window is None:
        return None
    top, left, bottom, right = window
    local = np.zeros((bottom - top, right - left), np.uint8)
    for line, thickness in zip(lines, thicknesses, strict=True):
        fixed = _to_fixed_point(line, top, left)
        cv2.polylines(local, [fixed], False, 1, int(thickness), cv2.LINE_8, _SUBPIXEL_BITS)
    return _stamp_from_local(local, top, left)


def _stamp_from_mask(mask: np.ndarray) -> _Stamp | None:
    """Crop a full-image mask to its bounding box."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return _Stamp(mask=mask[top:bottom, left:right], top=int(top), left=int(left))


# ----------------------------------------------------------------------------- stuff


def _band_labels(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """Labels 0..count-1 from wavy, roughly horizontal boundaries (sky, hills, ground)."""
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)[:, None]
    bases = np.sort(rng.uniform(0.15, 0.9, count - 1)) * height
    labels = np.zeros((height, width), np.int32)
    for base in bases:
        boundary = np.full(width, base, np.float32)
        for _ in range(3):
            amplitude = rng.uniform(0.01, 0.08) * height
            wavelength = rng.uniform(0.15, 1.2) * width
            phase = rng.uniform(0.0, 2.0 * np.pi)
            boundary += amplitude * np.sin(xs * (2.0 * np.pi / wavelength) + phase)
        labels += (ys >= boundary[None, :]).astype(np.int32)
    return labels


def _voronoi_labels(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """Labels 0..count-1 from a Voronoi partition with noisy, organic borders."""
    seeds = rng.uniform(0.0, 1.0, (count, 2)) * np.array([width, height])
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    short_side = min(height, width)
    warp = short_side * 0.08
    cell = max(4, short_side // 6)
    distances = np.stack(
        [
            np.hypot(xs - sx, ys - sy) + warp * _smooth_noise(rng, height, width, cell)
            for sx, sy in seeds
        ]
    )
    return np.argmin(distances, axis=0).astype(np.int32)


def _paint_stuff(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Cover the frame with 2-4 textured background regions, each in its own palette."""
    count = int(rng.integers(2, 5))
    partition = _band_labels if rng.uniform() < 0.5 else _voronoi_labels
    labels = partition(rng, canvas.height, canvas.width, count)
    chosen_colours = np.zeros((0, 3), np.float32)
    for label in range(count):
        stamp = _stamp_from_mask(labels == label)
        if stamp is None:
            continue
        base = _pick_distinct_colour(rng, chosen_colours)
        chosen_colours = np.concatenate([chosen_colours, base[None, :]])
        height, width = stamp.mask.shape
        canvas.paint(stamp, _texture(rng, height, width, base, spread=60.0))


# ----------------------------------------------------------------------------- things


def _thing_ellipse(rng: np.random.Generator, centre: np.ndarray, radius: float) -> list:
    """An ellipse of random aspect and orientation."""
    radii = (radius, radius * rng.uniform(0.4, 1.0))
    return [_ellipse_points(centre, radii, rng.uniform(0, np.pi), _outline_points(radius))]


def _thing_rectangle(rng: np.random.Generator, centre: np.ndarray, radius: float) -> list:
    """A rotated rectangle."""
    half_width, half_height = radius, radius * rng.uniform(0.3, 1.0)
    corners = np.array(
        [[-half_width, -half_height], [half_width, -half_height], [half_width, half_height]]
        + [[-half_width, half_height]]
    )
    return [centre + corners @ _rotation(rng.uniform(0, np.pi)).T]


def _thing_polygon(rng: np.random.Generator, centre: np.ndarray, radius: float) -> list:
    """An irregular star-shaped polygon, like a rock or a bush."""
    num_vertices = int(rng.integers(5, 12))
    return [_irregular_polygon_points(rng, centre, radius, num_vertices, jitter=0.5)]


_THING_SHAPES = (_thing_ellipse, _thing_rectangle, _thing_polygon)


def _thing_stamp(
    rng: np.random.Generator, centre: np.ndarray, radius: float, height: int, width: int
) -> _Stamp | None:
    """One medium object: an ellipse, rectangle, polygon or ring (ellipse with a hole)."""
    kind = int(rng.integers(len(_THING_SHAPES) + 1))
    if kind < len(_THING_SHAPES):
        return _stamp_polygons(_THING_SHAPES[kind](rng, centre, radius), height, width)
    radii = (radius, radius * rng.uniform(0.6, 1.0))
    angle = rng.uniform(0, np.pi)
    outer = _ellipse_points(centre, radii, angle, _outline_points(radius))
    inner_scale = rng.uniform(0.4, 0.75)
    inner_radii = (radii[0] * inner_scale, radii[1] * inner_scale)
    inner = _ellipse_points(centre, inner_radii, angle, _outline_points(radius))
    return _stamp_polygons([outer], height, width, holes=[inner])


def _paint_things(canvas: _Canvas, rng: np.random.Generator, count: int) -> None:
    """Paint medium objects of 5-25 % of the short side that partly occlude each other."""
    short_side = min(canvas.height, canvas.width)
    for _ in range(count):
        centre = rng.uniform(0.0, 1.0, 2) * np.array([canvas.width, canvas.height])
        radius = 0.5 * rng.uniform(0.05, 0.25) * short_side
        stamp = _thing_stamp(rng, centre, radius, canvas.height, canvas.width)
        if stamp is None:
            continue
        base = _pick_distinct_colour(rng, canvas.colour_under(stamp)[None, :])
        height, width = stamp.mask.shape
        canvas.paint(stamp, _texture(rng, height, width, base, spread=50.0))


# ----------------------------------------------------------------------------- small entities


def _blob_stamp(
    rng: np.random.Generator, centre: np.ndarray, diameter: float, height: int, width: int
) -> _Stamp | None:
    """A small ellipse or irregular polygon of about `diameter` pixels across."""
    radius = diameter / 2.0
    if rng.uniform() < 0.5:
        radii = (radius, radius * rng.uniform(0.5, 1.0))
        points = _ellipse_points(centre, radii, rng.uniform(0, np.pi), _outline_points(radius))
    else:
        points = _irregular_polygon_points(rng, centre, radius, int(rng.integers(5, 10)), 0.4)
    return _stamp_polygons([points], height, width)


def _speck_stamp(
    rng: np.random.Generator, centre: np.ndarray, height: int, width: int
) -> _Stamp | None:
    """A speck 2-4 px across (an insect, a distant bird), mostly lost in a 4x downscale."""
    return _blob_stamp(rng, centre, rng.uniform(2.0, 4.0), height, width)


def _small_blob_stamp(
    rng: np.random.Generator, centre: np.ndarray, height: int, width: int
) -> _Stamp | None:
    """A blob 4-30 px across, log-uniform so that most are small (pebbles, leaves, fruit)."""
    diameter = float(np.exp(rng.uniform(np.log(4.0), np.log(30.0))))
    return _blob_stamp(rng, centre, diameter, height, width)


def _stroke_thickness(rng: np.random.Generator) -> int:
    """A stroke width of 1-4 px, thin ones more likely."""
    return int(rng.choice(_STROKE_THICKNESSES, p=_STROKE_THICKNESS_PROBABILITIES))


def _stroke_stamp(
    rng: np.random.Generator, centre: np.ndarray, height: int, width: int
) -> _Stamp | None:
    """A thin bending line 8-300 px long (a cable, a pole, a stem, a blade of grass)."""
    length = float(np.exp(rng.uniform(np.log(8.0), np.log(300.0))))
    line = _random_walk_points(rng, centre, length, int(rng.integers(2, 8)))
    return _stamp_polylines([line], [_stroke_thickness(rng)], height, width)


def _branch_stamp(
    rng: np.random.Generator, centre: np.ndarray, height: int, width: int
) -> _Stamp | None:
    """A stem with a few thinner side twigs, drawn as one entity."""
    length = float(np.exp(rng.uniform(np.log(30.0), np.log(250.0))))
    stem = _random_walk_points(rng, centre, length, int(rng.integers(3, 8)))
    stem_thickness = _stroke_thickness(rng)
    lines, thicknesses = [stem], [stem_thickness]
    for _ in range(int(rng.integers(1, 4))):
        fork = stem[int(rng.integers(1, len(stem)))]
        twig_length = length * rng.uniform(0.15, 0.5)
        lines.append(_random_walk_points(rng, fork, twig_length, int(rng.integers(2, 4))))
        thicknesses.append(max(1, stem_thickness - 1))
    return _stamp_polylines(lines, thicknesses, height, width)


_SMALL_SHAPES = {
    "speck": _speck_stamp,
    "blob": _small_blob_stamp,
    "stroke": _stroke_stamp,
    "branch": _branch_stamp,
}


def _paint_small_entities(canvas: _Canvas, rng: np.random.Generator, count: int) -> None:
    """Paint the small and thin entities that vanish at network resolution."""
    kinds = list(_SMALL_KIND_PROBABILITIES)
    probabilities = np.array(list(_SMALL_KIND_PROBABILITIES.values()))
    for _ in range(count):
        kind = kinds[int(rng.choice(len(kinds), p=probabilities))]
        centre = rng.uniform(0.0, 1.0, 2) * np.array([canvas.width, canvas.height])
        stamp = _SMALL_SHAPES[kind](rng, centre, canvas.height, canvas.width)
        if stamp is None:
            continue
        base = _pick_distinct_colour(rng, canvas.colour_under(stamp)[None, :])
        height, width = stamp.mask.shape
        canvas.paint(stamp, _texture(rng, height, width, base, spread=35.0))


# ----------------------------------------------------------------------------- clean-up


def _surrounding_id(id_map: np.ndarray, entity_id: int, excluded: np.ndarray) -> int | None:
    """The most frequent other id on the one-pixel ring around an entity, avoiding `excluded`."""
    ys, xs = np.nonzero(id_map == entity_id)
    top, left = max(0, ys.min() - 1), max(0, xs.min() - 1)
    window = id_map[top : ys.max() + 2, left : xs.max() + 2]
    inside = (window == entity_id).astype(np.uint8)
    ring = cv2.dilate(inside, np.ones((3, 3), np.uint8)).astype(bool) & ~inside.astype(bool)
    neighbours = window[ring]
    if len(neighbours) == 0:
        return None
    preferred = neighbours[~np.isin(neighbours, excluded)]
    candidates = preferred if len(preferred) > 0 else neighbours
    values, counts = np.unique(candidates, return_counts=True)
    return int(values[np.argmax(counts)])


def _merge_tiny_entities(id_map: np.ndarray, image: np.ndarray, min_area: int) -> None:
    """Relabel entities that occlusion left below `min_area` pixels to their surrounding one.

    Annotations that small are noise rather than entities. Their pixels take the surrounding
    entity's id and its mean colour there, so the id map still covers every pixel.
    """
    while True:
        areas = np.bincount(id_map.ravel())
        tiny = np.flatnonzero((areas > 0) & (areas < min_area))
        if len(tiny) == 0:
            return
        merged_any = False
        for entity_id in tiny:
            target = _surrounding_id(id_map, int(entity_id), excluded=tiny)
            if target is None:
                continue
            merged_any = True
            _relabel(id_map, image, int(entity_id), target)
        if not merged_any:
            return


def _relabel(id_map: np.ndarray, image: np.ndarray, source: int, target: int) -> None:
    """Give the pixels of entity `source` to `target`, recoloured to match its neighbourhood."""
    ys, xs = np.nonzero(id_map == source)
    top, left = max(0, ys.min() - 2), max(0, xs.min() - 2)
    rows, cols = slice(top, ys.max() + 3), slice(left, xs.max() + 3)
    window_ids, window_image = id_map[rows, cols], image[rows, cols]
    source_mask, target_mask = window_ids == source, window_ids == target
    window_image[source_mask] = window_image[target_mask].mean(axis=0)
    window_ids[source_mask] = target


def _renumber_consecutive(id_map: np.ndarray) -> np.ndarray:
    """Map the surviving ids to 1..K, keeping their painting (back-to-front) order."""
    present = np.flatnonzero(np.bincount(id_map.ravel()))
    lookup = np.zeros(int(id_map.max()) + 1, np.int32)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lookup[id_map]


def _finish_image(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Soften aliased edges slightly and add sensor noise, so the JPEG looks like a photo."""
    softened = cv2.GaussianBlur(image, (3, 3), 0.6)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * 3.0
    return np.clip(softened + noise + 0.5, 0.0, 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- scene


def _check_at_least(name: str, value: int, minimum: int) -> None:
    """Raise a one-line ValueError naming the argument when it is below its minimum."""
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _validate_scene_arguments(height: int, width: int, num_objects: int, num_small: int) -> None:
    """Reject scene sizes and counts that cannot make a meaningful scene."""
    _check_at_least("height", height, MIN_IMAGE_SIDE)
    _check_at_least("width", width, MIN_IMAGE_SIDE)
    _check_at_least("num_objects", num_objects, 0)
    _check_at_least("num_small", num_small, 0)


def render_scene(
    rng: np.random.Generator, height: int, width: int, num_objects: int, num_small: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene.

    Returns the RGB image (uint8 [H, W, 3]) and the entity id map (int32 [H, W]) whose ids are
    1..K in back-to-front order; every pixel belongs to an entity of at least
    ``MIN_ENTITY_AREA`` pixels.
    """
    _validate_scene_arguments(height, width, num_objects, num_small)
    canvas = _Canvas(height, width)
    _paint_stuff(canvas, rng)
    _paint_things(canvas, rng, num_objects)
    _paint_small_entities(canvas, rng, num_small)
    _merge_tiny_entities(canvas.id_map, canvas.image, MIN_ENTITY_AREA)
    id_map = _renumber_consecutive(canvas.id_map)
    return _finish_image(rng, canvas.image), id_map


# ----------------------------------------------------------------------------- dataset


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of image `index`: independent of how many images are generated."""
    return np.random.default_rng([seed, index])


def _image_file_name(index: int) -> str:
    """File name of image `index`, relative to the images directory."""
    return f"synthetic_{index:06d}.jpg"


def _save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    """Write an RGB uint8 image as a baseline JPEG (deterministic for a given Pillow)."""
    Image.fromarray(image).save(path, format="JPEG", quality=quality)


def _annotations_for(id_map: np.ndarray, image_id: int, first_annotation_id: int) -> list[dict]:
    """COCO annotations of one image, one per entity 1..K, ids from `first_annotation_id`."""
    return [
        mask_to_annotation(first_annotation_id + offset, image_id, id_map == offset + 1)
        for offset in range(int(id_map.max()))
    ]


def _progress(indices: range, show_progress: bool) -> Iterable[int]:
    """Wrap `indices` in a rich progress bar on stderr, so stdout keeps only the result."""
    if not show_progress:
        return indices
    from rich.console import Console  # imported lazily: only interactive runs draw a bar
    from rich.progress import track

    return track(indices, description="Rendering scenes", console=Console(stderr=True))


def _dataset_info(parameters: dict) -> dict:
    """The COCO `info` block: how the data was made, without dates or paths (reproducible)."""
    return {
        "description": "entityseg synthetic entity segmentation scenes",
        "generator": "entityseg.data.synthetic",
        "min_entity_area": MIN_ENTITY_AREA,
        **parameters,
    }


def _write_json(data: dict, path: Path) -> None:
    """Write JSON with sorted keys and fixed separators, so equal data gives equal bytes."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    path.write_text(text + "\n", encoding="utf-8", newline="\n")


def _validate_dataset_arguments(
    num_images: int,
    seed: int,
    height: int,
    width: int,
    num_objects: int,
    num_small: int,
    quality: int,
) -> None:
    """Reject bad dataset arguments before any file is written."""
    _check_at_least("num_images", num_images, 1)
    _check_at_least("seed", seed, 0)
    _validate_scene_arguments(height, width, num_objects, num_small)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")


def generate_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    height: int = 768,
    width: int = 1024,
    num_objects: int = 12,
    num_small: int = 60,
    quality: int = 95,
    show_progress: bool = False,
) -> Path:
    """Render `num_images` scenes into `out_dir`/images and write COCO annotations.

    Image i depends only on (seed, i, sizes, counts), and the same arguments give
    byte-identical files. Returns the path of annotations.json.
    """
    _validate_dataset_arguments(num_images, seed, height, width, num_objects, num_small, quality)
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for index in _progress(range(num_images), show_progress):
        image, id_map = render_scene(_image_rng(seed, index), height, width, num_objects, num_small)
        file_name = _image_file_name(index)
        _save_jpeg(image, images_dir / file_name, quality)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations.extend(_annotations_for(id_map, image_id, len(annotations) + 1))

    parameters = {
        "seed": seed,
        "num_images": num_images,
        "height": height,
        "width": width,
        "num_objects": num_objects,
        "num_small": num_small,
        "quality": quality,
    }
    data = {
        "info": _dataset_info(parameters),
        "images": images,
        "annotations": annotations,
        "categories": [dict(ENTITY_CATEGORY)],
    }
    annotations_path = out_dir / ANNOTATIONS_FILENAME
    _write_json(data, annotations_path)
    return annotations_path


def _build_parser() -> argparse.ArgumentParser:
    """Command-line options, named like the arguments of `generate_dataset`."""
    parser = argparse.ArgumentParser(
        prog="python -m entityseg.data.synthetic",
        description="Render deterministic synthetic entity segmentation scenes (COCO RLE).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-images", required=True, type=int, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--height", type=int, default=768, help="image height (default 768)")
    parser.add_argument("--width", type=int, default=1024, help="image width (default 1024)")
    parser.add_argument("--num-objects", type=int, default=12, help="medium things per image")
    parser.add_argument("--num-small", type=int, default=60, help="small and thin entities")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: generate a data set and print the annotations path."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    options = {
        "num_images": args.num_images,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "num_objects": args.num_objects,
        "num_small": args.num_small,
        "quality": args.quality,
    }
    try:
        _validate_dataset_arguments(**options)
    except ValueError as error:
        parser.error(str(error))  # usage message and exit status 2, as for any bad option
    print(generate_dataset(args.out, show_progress=True, **options))


if __name__ == "__main__":
    main()
