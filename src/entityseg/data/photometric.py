"""Optional photometric training augmentation (``data.photometric``), built with albumentations.

For users' own, small data sets: random changes of brightness, contrast, colour, gamma,
noise and sharpness that leave every pixel where it is. Two rules make it safe for CropFormer:

* **Photometric only.** Geometry (short side, flip, crop box, large-scale jitter) is our own
  code in :mod:`.views`, because the release's views need detectron2's exact arithmetic;
  a geometric transform here would move the pixels away from the entity masks and the crop
  boxes. Nothing here changes the image's size or any mask.
* **One draw per image.** The transform is applied once, to the decoded full RGB image, before
  the views are cut, so the full image I^O and its crops I^C show the same brightness, colour
  and noise: the batch-level ground truth G_b links an entity's masks across views, and the
  batch decoder's queries Q_b attend over all views at once, so views of one image must not
  look like different photos.

The draws come from the training sample's numpy generator (:class:`.views.EntityViewsDataset`
spawns a child of it), so a run is reproducible with ``seed_everything`` like the rest of the
training augmentation. Validation, test and prediction images are never changed.

``default`` (each transform applied independently with its probability ``p``):

====================================  =====  =============================================
transform                             p      range
====================================  =====  =============================================
``RandomBrightnessContrast``          0.5    brightness +-0.2 (of 255), contrast +-0.2
``HueSaturationValue``                0.3    hue +-10, saturation +-20, value 0 (of 255)
``RandomGamma``                       0.3    gamma 0.8 .. 1.2
``GaussNoise``                        0.2    std 0.01 .. 0.04 of 255 (2.5 .. 10 grey levels)
``GaussianBlur``                      0.1    kernel 3 .. 5 px, sigma 0.1 .. 1.0 px
====================================  =====  =============================================

Noise and blur act on the full-resolution image, so the network sees them scaled down with it.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from albumentations import Compose

#: ``data.photometric`` values other than ``None`` (off).
PHOTOMETRIC_PIPELINES = ("default",)


def _default_transforms() -> list:
    import albumentations as A

    return [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=0, p=0.3),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.0), p=0.1),
    ]


_TRANSFORMS = {"default": _default_transforms}


def build_photometric(name: str) -> Compose:
    """The photometric pipeline called ``name`` (one of :data:`PHOTOMETRIC_PIPELINES`)."""
    if name not in _TRANSFORMS:
        raise ValueError(f"photometric={name!r}: expected one of {PHOTOMETRIC_PIPELINES}")
    # a library makes no network calls: albumentations asks PyPI for updates on import
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A.Compose(_TRANSFORMS[name]())


def apply_photometric(pipeline: Compose, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` uint8 RGB ``[H, W, 3]`` after one draw of ``pipeline``: uint8 ``[H, W, 3]``.

    Every random choice (whether each transform applies, and its parameters) comes from
    ``rng``, so the same generator state gives the same image.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    pipeline.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    out = pipeline(image=np.ascontiguousarray(image))["image"]
    if out.shape != image.shape or out.dtype != np.uint8:  # photometric only, by construction
        raise RuntimeError(f"photometric pipeline changed {image.shape} to {out.shape}")
    return out
