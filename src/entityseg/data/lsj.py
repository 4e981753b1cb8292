"""Large-scale jitter (LSJ): the Mask2Former baseline's training augmentation.

The release's ``coco_instance_lsj`` mapper applies, in this order, to the original image:
a random horizontal flip; detectron2's ``ResizeScale`` (a random scale ``s`` in
``[min_scale, max_scale]`` of the square ``S x S``; the image is resized, keeping its aspect,
to fit inside ``sS x sS``); ``FixedSizeCrop`` (a crop of at most ``S x S`` at a random offset,
then padding at the bottom and right to ``S x S`` with 128). Images are resized with Pillow
bilinear, masks with Pillow nearest, as :func:`entityseg.data.crops.crop_and_resize` does.

The random draws (:func:`lsj_resize_size`, :func:`lsj_crop_offset`) are kept apart from the
deterministic making of the view (:func:`lsj_image`, :func:`lsj_masks`), so that a view can be
rebuilt from recorded draws (the release's ``TransformList`` in ``training.pt``).

One deliberate difference: masks are padded with 0. Recent detectron2's ``FixedSizeCrop``
pads segmentations with ``seg_pad_value=255`` (meant as the ignore label of semantic maps);
the release feeds its instance masks through the same ``apply_segmentation``, so every
instance mask of the release covers the whole padded area (its ``training.pt`` shows it).
``mask_pad_value=1`` reproduces that for parity checks.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from entityseg.data.crops import pil_nearest_index

#: ``FixedSizeCrop``'s pad value for the image, in 0..255 before normalisation: after
#: normalisation the padded area is ``(128 - mean) / std``, not 0.
LSJ_PAD_VALUE = 128


def lsj_resize_size(height: int, width: int, image_size: int, scale: float) -> tuple[int, int]:
    """``ResizeScale``'s output (h, w) for an image of ``height x width`` and scale ``scale``.

    The target square ``scale * image_size`` bounds both sides: the image scale is
    ``min(target / H, target / W)``, so the long side becomes ``scale * image_size`` and the
    short side follows the aspect; both are rounded with ``np.round`` (half to even), as
    detectron2 does. At least 1 pixel each (detectron2 would fail below that).
    """
    target = np.multiply((image_size, image_size), scale)
    image_scale = np.minimum(target[0] / height, target[1] / width)
    new_h, new_w = np.round(np.multiply((height, width), image_scale)).astype(int)
    return max(1, int(new_h)), max(1, int(new_w))


def lsj_crop_offset(resized: tuple[int, int], image_size: int, fraction: float) -> tuple[int, int]:
    """``FixedSizeCrop``'s crop offset (y0, x0) in the resized image.

    detectron2 draws ONE uniform ``fraction`` in [0, 1) for both axes and places the crop at
    ``round(fraction * max(0, side - image_size))`` along each (``np.round``, half to even):
    the offsets of the two axes are not independent.
    """
    max_offset = np.maximum(np.subtract(resized, (image_size, image_size)), 0)
    y0, x0 = np.round(np.multiply(max_offset, fraction)).astype(int)
    return int(y0), int(x0)


def lsj_valid_size(
    resized: tuple[int, int], offset: tuple[int, int], image_size: int
) -> tuple[int, int]:
    """(h, w) of the image content in the ``image_size`` square: the rest is padding."""
    return (
        min(image_size, resized[0] - offset[0]),
        min(image_size, resized[1] - offset[1]),
    )


def _check(resized: tuple[int, int], offset: tuple[int, int], image_size: int) -> None:
    if min(resized) < 1 or image_size < 1:
        raise ValueError(f"LSJ sizes must be positive: resized {resized}, square {image_size}")
    if not all(0 <= o < max(1, r - image_size + 1) for o, r in zip(offset, resized, strict=True)):
        raise ValueError(f"LSJ crop offset {offset} is outside a {resized} image")


def lsj_image(
    image: np.ndarray,
    flipped: bool,
    resized: tuple[int, int],
    offset: tuple[int, int],
    image_size: int,
) -> np.ndarray:
    """The LSJ view uint8 ``[S, S, 3]`` of an RGB image ``[H, W, 3]``: flip, resize, crop, pad.

    The whole image is resized (Pillow bilinear needs the pixels around the crop anyway); the
    padded area holds :data:`LSJ_PAD_VALUE`.
    """
    _check(resized, offset, image_size)
    source = image[:, ::-1] if flipped else image
    pil = Image.fromarray(np.ascontiguousarray(source))
    big = np.asarray(pil.resize((resized[1], resized[0]), Image.Resampling.BILINEAR))
    y0, x0 = offset
    crop = big[y0 : y0 + image_size, x0 : x0 + image_size]  # [h, w, 3], h, w <= S
    out = np.full((image_size, image_size, 3), LSJ_PAD_VALUE, dtype=np.uint8)
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def lsj_masks(
    masks: np.ndarray,
    flipped: bool,
    resized: tuple[int, int],
    offset: tuple[int, int],
    image_size: int,
    mask_pad_value: int = 0,
) -> np.ndarray:
    """The LSJ view of masks ``[M, H, W]`` -> ``[M, S, S]`` (same dtype), zero-padded.

    Pillow-nearest resize, computed only for the rows and columns inside the crop (a gather):
    a 2x upscaled 4000 x 3000 mask is never materialised. ``mask_pad_value=1`` reproduces the
    release's padding (see the module docstring).
    """
    _check(resized, offset, image_size)
    height, width = masks.shape[-2:]
    y0, x0 = offset
    rows = pil_nearest_index(height, resized[0])[y0 : y0 + image_size]  # [h]
    cols = pil_nearest_index(width, resized[1])[x0 : x0 + image_size]  # [w]
    if flipped:
        cols = width - 1 - cols
    crop = masks[:, :, cols][:, rows]  # [M, h, w]
    out = np.full((masks.shape[0], image_size, image_size), mask_pad_value, dtype=masks.dtype)
    out[:, : crop.shape[1], : crop.shape[2]] = crop
    return out
