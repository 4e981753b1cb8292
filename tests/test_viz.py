import numpy as np
import pycocotools.mask as mask_utils
import torch

from entityseg.inference.fusion import Entities
from entityseg.viz import (
    compare_modes,
    entity_colors,
    fit_within,
    highlight_entities,
    id_map_from_rles,
    image_grid,
    overlay_id_map,
    overlay_masks,
)


def test_colors_are_distinct():
    colors = entity_colors(50)
    assert len({tuple(c) for c in colors}) == 50


def test_overlay_colours_entities_and_outlines_them():
    image = np.full((20, 30, 3), 100, np.uint8)
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:10, 2:12] = True
    masks[1, 5:15, 8:25] = True  # painted over the first where they overlap
    out = overlay_masks(image, masks)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.all(out[0, 0] == 100)  # background untouched
    assert not np.array_equal(out[6, 4], out[12, 20])  # two entities, two colours
    assert (out[13:17, 20] == 255).all(-1).any()  # the outline at the bottom edge of entity 2


def test_id_map_from_rles_and_compare_modes():
    masks = np.zeros((2, 16, 24), np.uint8)
    masks[0, :8] = 1
    masks[1, 8:, 12:] = 1
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    id_map = id_map_from_rles(rles, 16, 24)
    assert id_map.dtype == np.uint16 and set(np.unique(id_map)) == {0, 1, 2}
    entities = Entities(
        rles=rles,
        scores=torch.tensor([0.9, 0.8]),
        query_indices=torch.tensor([3, 1]),
        image_size=(16, 24),
    )
    image = np.zeros((16, 24, 3), np.uint8)
    panel = compare_modes(image, {"image_o": entities, "batch_oc": entities}, [(0, 0, 12, 8)])
    assert panel.shape == (16, 3 * 24 + 2 * 4, 3)
    assert overlay_id_map(image, id_map).shape == image.shape


def test_image_grid_rows():
    tiles = [np.zeros((10, 12, 3), np.uint8)] * 5
    grid = image_grid(tiles, columns=2, gap=2)
    assert grid.shape == (3 * (10 + 2), 2 * 12 + 2, 3)


def test_highlight_colours_only_the_chosen_entities_and_rings_them():
    image = np.full((40, 60, 3), 100, np.uint8)
    id_map = np.zeros((40, 60), np.uint16)
    id_map[5:20, 5:25] = 1
    id_map[22:38, 30:55] = 2
    out = highlight_entities(image, id_map, [2])
    full = overlay_id_map(image, id_map)
    assert np.array_equal(out[30, 42], full[30, 42])  # entity 2 inside: coloured as usual
    assert np.array_equal(out[12, 15], image[12, 15])  # entity 1 inside: the photo itself
    assert np.array_equal(out[5, 15], [160, 160, 160])  # entity 1's outline in grey
    assert np.array_equal(out[22, 42], [255, 220, 0])  # entity 2 ringed in yellow
    nothing = highlight_entities(image, id_map, [])  # only the grey outlines on the photo
    outline = (nothing != image).any(-1)
    assert outline.any() and (nothing[outline] == 160).all()


def test_fit_within_shrinks_only_large_pictures():
    picture = np.zeros((300, 1200, 3), np.uint8)
    assert fit_within(picture, 600).shape == (150, 600, 3)
    assert fit_within(picture, 2000) is picture


def test_overlapping_crops_are_thin_rectangles_each_in_its_own_colour():
    from entityseg.data.crops import crop_boxes
    from entityseg.viz import CROP_COLORS, draw_boxes

    image = np.zeros((300, 400, 3), np.uint8)
    boxes = crop_boxes(300, 400, "fixed4", 0.7)  # the four corners, overlapping in the middle
    assert boxes == [(0, 0, 280, 210), (120, 0, 400, 210), (0, 90, 280, 300), (120, 90, 400, 300)]
    drawn = draw_boxes(image, boxes)
    # an outer edge of each crop where no other crop runs: its own colour, inset by its rank
    edges = {0: (50, 0), 1: (50, 399 - 1), 2: (250, 0 + 2), 3: (250, 399 - 3)}
    for k, (y, x) in edges.items():
        assert tuple(drawn[y, x]) == CROP_COLORS[k], (k, drawn[y, x])
    assert len(set(CROP_COLORS[:4])) == 4
    assert tuple(drawn[50, 1]) == (0, 0, 0)  # one pixel wide at this size
