"""Crop boxes Gamma{I^O, delta} and the geometry between a crop view I^C and the image I^O.

The paper's crop and resize, I = {I^O, I^C} = Gamma{I^O, delta} with
I in R^{N x 2 x H_I x W_I x 3}: CropFormer pairs the full image I^O with crops I^C whose sides
are the ratio delta of the image's (``data.crop_delta``, 0.7 as released; paper Table 9a),
laid out as in Table 9b (``fixed4``, ``fixed8``, ``random``; ``data.train_crop_layout``,
``data.test_crop_layout``), all resized to the same network size H_I x W_I (the views of
:mod:`entityseg.data.views` stack them as ``images [N, V, 3, H, W]``).

This module decides *where* the crops are (``crop_boxes``), cuts and resizes an image or its
masks to a view (``crop_and_resize``); inference maps views back into the original image
(:func:`entityseg.inference.fusion.fused_probabilities`). Boxes are ``(x0, y0, x1, y1)`` integer
pixels of the original image, x1/y1 exclusive.

Views are made as the release's mapper makes them (Pillow bilinear for images, Pillow nearest for
masks, both with half-pixel centres), so its training views are reproduced pixel for pixel.
Predictions go back with PyTorch ``bilinear`` (``align_corners=False``), also half-pixel
centred, as the release's ``sem_seg_postprocess``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

#: Layouts accepted by :func:`crop_boxes`.
CROP_LAYOUTS = ("fixed4", "fixed8", "random", "grid")

#: The release's CROP_STRIDE_RATIO: crops start every 0.6 of the side, clamped to the border.
STRIDE_RATIO = 0.6

#: The shortest image side that :func:`crop_boxes` cuts crops from.
MIN_IMAGE_SIDE = 4

#: Least fraction of a ``grid`` crop's side that it shares with its neighbour.
GRID_OVERLAP = 0.25


def check_delta(delta: float | Sequence[float]) -> None:
    """Raise ``ValueError`` unless delta (or each end of a range) lies in (0, 1]."""
    values = [delta] if isinstance(delta, int | float) else list(delta)
    if not values or any(not 0.0 < float(v) <= 1.0 for v in values):
        raise ValueError(f"crop ratio delta={delta} is outside (0, 1]")
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"crop ratio range delta={delta} is not (low, high)")


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` for an unknown crop layout."""
    if layout not in CROP_LAYOUTS:
        raise ValueError(f"unknown crop layout {layout!r}; expected one of {CROP_LAYOUTS}")


def check_image_size(height: int, width: int) -> None:
    """Raise ``ValueError`` for an image too small to segment: crops of a side under
    :data:`MIN_IMAGE_SIDE` pixels would be empty or a single pixel."""
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image of {width}x{height} pixels is too small to segment (both sides must be at "
            f"least {MIN_IMAGE_SIDE} pixels)"
        )


def crop_boxes(
    height: int,
    width: int,
    layout: str = "fixed4",
    delta: float | tuple[float, float] = 0.7,
    rng: np.random.Generator | None = None,
    *,
    grid_overlap: float = GRID_OVERLAP,
) -> list[Box]:
    """Crop boxes of one image, in integer pixels of that image: the crop half of the paper's
    Gamma{I^O, delta} (``delta`` the crop ratio; layouts of paper Table 9b).

    Layouts:
      * ``fixed4``: the release's grid. Crop size ``int(delta*W) x int(delta*H)``; starts every
        ``int(0.6*W)`` / ``int(0.6*H)`` pixels, each clamped so the crop ends at the border;
        row by row. For every image of at least 4 x 4 pixels this gives the four corner crops
        (top-left, top-right, bottom-left, bottom-right).
      * ``fixed8``: the ``fixed4`` corners followed by the four edge centres (top, left, right,
        bottom), each centred on its edge (offset ``(W - w) // 2`` or ``(H - h) // 2``).
        ``fixed8[:4] == fixed4``.
      * ``random``: one crop of the same size at a uniformly random integer position; ``delta``
        may be a ``(low, high)`` range, from which one ratio is drawn per call. Needs ``rng``.
      * ``grid``: k x k crops of the same size, for images far larger than the network size
        (small delta). Along each side the k starts are spread evenly from 0 to the last
        position (``round(i * (W - w) / (k - 1))``), so the crops cover every pixel, the first
        and last touch the borders, and neighbours share about ``grid_overlap`` of a crop's
        side or more (entities cut by one crop's edge lie whole in its neighbour more often):
        ``k = ceil((1 - delta) / (delta * (1 - grid_overlap))) + 1``, raised if the integer
        crop size needs more to cover the image; row by row. ``delta=1`` gives the whole image;
        the default overlap 0.25 gives the ``fixed4`` corners for delta >= 0.58 (0.7 included),
        3 x 3 crops for delta 0.5 and 5 x 5 for delta 0.3.
    """
    check_layout(layout)
    if layout != "random" and not isinstance(delta, int | float):
        raise ValueError(f"crop layout {layout!r} takes one ratio delta, got {delta}")
    check_delta(delta)
    check_image_size(height, width)
    if layout == "random":
        if rng is None:
            raise ValueError("crop layout 'random' needs a numpy Generator rng")
        ratio = float(delta) if isinstance(delta, int | float) else float(rng.uniform(*delta))
        crop_w, crop_h = _crop_size(height, width, ratio)
        x0 = int(rng.integers(0, width - crop_w + 1))
        y0 = int(rng.integers(0, height - crop_h + 1))
        return [(x0, y0, x0 + crop_w, y0 + crop_h)]

    crop_w, crop_h = _crop_size(height, width, float(delta))
    if layout == "grid":
        return _grid_boxes(height, width, crop_h, crop_w, float(delta), grid_overlap)
    boxes = [
        (x1 - crop_w, y1 - crop_h, x1, y1)
        for y1 in _clamped_ends(height, crop_h)
        for x1 in _clamped_ends(width, crop_w)
    ]
    if layout == "fixed8":
        mid_x, mid_y = (width - crop_w) // 2, (height - crop_h) // 2
        far_x, far_y = width - crop_w, height - crop_h
        boxes += [
            (mid_x, 0, mid_x + crop_w, crop_h),
            (0, mid_y, crop_w, mid_y + crop_h),
            (far_x, mid_y, width, mid_y + crop_h),
            (mid_x, far_y, mid_x + crop_w, height),
        ]
    return boxes


def _crop_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    return max(1, int(ratio * width)), max(1, int(ratio * height))


def _clamped_ends(side: int, crop: int) -> list[int]:
    """Exclusive ends of the release's crops along one side: start every 0.6 side, clamp."""
    stride = int(STRIDE_RATIO * side)
    return [min(start + crop, side) for start in range(0, side, stride)]


def _grid_boxes(
    height: int, width: int, crop_h: int, crop_w: int, delta: float, overlap: float
) -> list[Box]:
    """The ``grid`` layout: k x k crops, evenly spaced starts, row by row."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"grid overlap {overlap} is outside [0, 1)")
    wanted = math.ceil((1.0 - delta) / (delta * (1.0 - overlap)) - 1e-9) + 1
    covering = max(
        -(-(side - crop) // crop) + 1 for side, crop in ((height, crop_h), (width, crop_w))
    )
    count = max(wanted, covering)
    return [
        (x0, y0, x0 + crop_w, y0 + crop_h)
        for y0 in _even_starts(height, crop_h, count)
        for x0 in _even_starts(width, crop_w, count)
    ]


def _even_starts(side: int, crop: int, count: int) -> list[int]:
    """``count`` crop starts from 0 to ``side - crop``, evenly spaced, rounded half up."""
    if count == 1:
        return [0]
    span, steps = side - crop, count - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(count)]


def crop_and_resize(
    array: np.ndarray,
    box: Box,
    size: tuple[int, int],
    is_mask: bool = False,
    flip: bool = False,
) -> np.ndarray:
    """Cut ``box`` out of an image ``[H, W, C]`` (or masks ``[M, H, W]``) and resize to (h, w):
    the resize half of the paper's Gamma{I^O, delta}, one crop I^C at the network size.

    Images are resized with Pillow's bilinear filter (antialiased when shrinking) and masks
    with Pillow's nearest neighbour (:func:`pil_nearest_index`): that is what the release's
    mapper does (detectron2's ``ResizeTransform``), so its views are reproduced exactly. Masks
    are resized as a gather of source rows and columns: no full-resolution intermediate is
    made, which matters for hundreds of masks of a 4000 x 3000 photo.

    ``flip=True`` cuts ``box`` out of the horizontally mirrored array (``box`` is in the
    mirrored image's pixels), as the release flips the original image first and then crops and
    resizes. Mirroring first is not the same as mirroring the resized view: Pillow's nearest
    neighbour is not mirror-symmetric where a target pixel centre falls exactly between two
    source pixels (bilinear is). Nothing full-size is mirrored: only the crop is read.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    out_h, out_w = size
    width = array.shape[-1] if is_mask else array.shape[1]
    if is_mask:
        rows = y0 + pil_nearest_index(y1 - y0, out_h)
        cols = x0 + pil_nearest_index(x1 - x0, out_w)
        if flip:  # column c of the mirrored image is column W - 1 - c of the array
            cols = width - 1 - cols
        return array[:, :, cols][:, rows]
    # the box of the mirrored image is columns W - x1 .. W - x0 of the array, mirrored
    crop = array[y0:y1, width - x1 : width - x0][:, ::-1] if flip else array[y0:y1, x0:x1]
    image = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR))


@lru_cache(maxsize=256)
def pil_nearest_index(source: int, target: int) -> np.ndarray:
    """Source pixel of each of ``target`` pixels when Pillow resizes ``source`` nearest.

    Pillow (``ImagingScaleAffine``) starts at ``0.5 * s`` (``s = source / target``), adds ``s``
    once per pixel in double precision and truncates. Mathematically that is
    ``floor((i + 0.5) * s)``, but where that product is an exact integer the accumulated sum
    can fall just below it and Pillow picks the pixel before: e.g. 640 -> 240 maps target 4 to
    source 11, not 12. Such ties differ from OpenCV's ``INTER_NEAREST_EXACT``; the release
    resizes masks with Pillow, so we follow Pillow. Read-only int64 array ``[target]``.
    """
    step = source / target
    index = np.empty(target, dtype=np.int64)
    position = 0.5 * step
    for i in range(target):  # sequential on purpose: the rounding of each sum matters
        index[i] = int(position)
        position += step
    index = np.minimum(index, source - 1)
    index.flags.writeable = False
    return index
