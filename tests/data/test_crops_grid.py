import math

import numpy as np
import pytest

from entityseg.data.crops import CROP_LAYOUTS, GRID_OVERLAP, crop_boxes

SIZES = [(4, 4), (5, 7), (33, 17), (427, 640), (360, 640), (768, 1024), (3000, 4000)]
DELTAS = [0.2, 0.3, 0.45, 0.5, 0.7, 0.9, 1.0]


def coverage(boxes, height, width):
    """How many boxes cover each pixel."""
    count = np.zeros((height, width), dtype=np.int32)
    for x0, y0, x1, y1 in boxes:
        count[y0:y1, x0:x1] += 1
    return count


def test_grid_is_a_layout():
    assert "grid" in CROP_LAYOUTS


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("size", SIZES)
def test_grid_boxes_are_inside_same_size_and_cover_every_pixel(size, delta):
    height, width = size
    boxes = crop_boxes(height, width, "grid", delta)
    crop_w, crop_h = max(1, int(delta * width)), max(1, int(delta * height))
    assert all(x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height for x0, y0, x1, y1 in boxes)
    assert all((x1 - x0, y1 - y0) == (crop_w, crop_h) for x0, y0, x1, y1 in boxes)
    assert coverage(boxes, height, width).min() >= 1
    k = math.isqrt(len(boxes))
    assert k * k == len(boxes)  # k x k, row by row
    assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == (width, height)
    if min(size) >= 300:
        assert len(set(boxes)) == len(boxes)


@pytest.mark.parametrize("delta", DELTAS)
def test_grid_is_deterministic(delta):
    assert crop_boxes(3000, 4000, "grid", delta) == crop_boxes(3000, 4000, "grid", delta)


@pytest.mark.parametrize(
    ("delta", "k"), [(1.0, 1), (0.9, 2), (0.7, 2), (0.6, 2), (0.5, 3), (0.3, 5), (0.2, 7)]
)
def test_grid_count_follows_delta_and_overlap(delta, k):
    assert k == math.ceil((1 - delta) / (delta * (1 - GRID_OVERLAP)) - 1e-9) + 1
    assert len(crop_boxes(3000, 4000, "grid", delta)) == k * k


def test_grid_starts_are_evenly_spread():
    boxes = crop_boxes(3000, 4000, "grid", 0.5)
    assert sorted({b[0] for b in boxes}) == [0, 1000, 2000]
    assert sorted({b[1] for b in boxes}) == [0, 750, 1500]
    assert boxes[:3] == [(0, 0, 2000, 1500), (1000, 0, 3000, 1500), (2000, 0, 4000, 1500)]


@pytest.mark.parametrize("size", SIZES)
def test_grid_at_release_ratio_is_fixed4(size):
    assert crop_boxes(*size, "grid", 0.7) == crop_boxes(*size, "fixed4", 0.7)


def test_full_ratio_is_the_whole_image():
    assert crop_boxes(300, 400, "grid", 1.0) == [(0, 0, 400, 300)]


def test_neighbours_share_the_overlap():
    for overlap in (0.0, 0.25, 0.5):
        boxes = crop_boxes(3000, 4000, "grid", 0.3, grid_overlap=overlap)
        starts = sorted({b[0] for b in boxes})
        crop_w = boxes[0][2] - boxes[0][0]
        shared = min(crop_w - (b - a) for a, b in zip(starts, starts[1:], strict=False))
        assert shared >= overlap * crop_w - 1
    assert len(crop_boxes(3000, 4000, "grid", 0.3, grid_overlap=0.5)) > len(
        crop_boxes(3000, 4000, "grid", 0.3)
    )


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        crop_boxes(300, 400, "grid", 0.5, grid_overlap=1.0)
    with pytest.raises(ValueError, match="one ratio"):
        crop_boxes(300, 400, "grid", (0.5, 0.7))
