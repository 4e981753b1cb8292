"""One image -> the CropFormer input views I = {I^O, I^C} and their per-view entity targets.

A sample holds ``V`` views of one image: view 0 is the full image I^O, views 1.. the crops
I^C (one crop at train time, the k fixed crops at test time); or, for the Mask2Former
baseline's large-scale jitter, one jittered view (V = 1). Entity masks go through exactly the
same flip, crop and resize, one mask at a time, so that a 4000 x 3000 photo with hundreds of
entities stays in memory.

Training samples are made in two steps so that a sample can be rebuilt from recorded draws
(the release's ``training.pt``): :class:`EntityViewsDataset` draws (short side, crop box, flip;
or the LSJ flip, scale and offset), and :func:`crop_views_sample` / :func:`lsj_sample` make the
sample from them deterministically. Under them, :func:`render_crop_views` /
:func:`render_lsj_view` give the uint8 views and masks before normalisation
(:class:`RenderedViews`), and :func:`entity_targets` turns per-view masks into targets.

Order of operations, as the release's ``entity_crop`` mapper: flip the original image, then
crop from the flipped image, then resize (Pillow bilinear; masks Pillow nearest). Crop boxes
are in the flipped image's pixels (the release's ``crop_region``). The fixed grids are drawn
from the flipped image, whose size is the original's, so the release's crop index k is our
index k; in the unflipped original the box of index k is ``flip_box(box_k, W)``, which for
``fixed4`` is the box of index ``k ^ 1`` (top-left <-> top-right, bottom-left <->
bottom-right). Cropping first and mirroring the view gives the same image pixels (Pillow
bilinear is mirror-symmetric) but not always the same masks (Pillow nearest is not at exact
ties), hence flip first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from entityseg.config import ConfigError
from entityseg.data.coco_entity import EntityImage, iter_entity_masks, read_entity_image
from entityseg.data.crops import Box, check_image_size, crop_and_resize, crop_boxes
from entityseg.data.errors import EntityDataError
from entityseg.data.lsj import (
    lsj_crop_offset,
    lsj_image,
    lsj_masks,
    lsj_resize_size,
    lsj_valid_size,
)
from entityseg.data.photometric import PHOTOMETRIC_PIPELINES, apply_photometric, build_photometric
from entityseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    scaled_sizes,
    shortest_edge_size,
)

log = logging.getLogger(__name__)

#: ``(annotation id, mask [H, W] uint8/bool)`` of each entity, as ``iter_entity_masks`` yields.
EntityMasks = Iterable[tuple[int, np.ndarray]]
#: A mask stack of one view: numpy or torch, bool or uint8, ``[M, h, w]``.
MaskArray = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ViewConfig:
    """How views are made: sizes, crops, flip and normalisation."""

    short_sizes: tuple[int, ...]
    max_size: int
    crop_layout: str
    crop_delta: float
    flip_prob: float
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    #: size of the crop views: ``"same"`` every view at the full view's size (ours, the training
    #: default: one network size for all views); ``"own"`` each crop resized by its own shortest
    #: edge (the release: at train time with the same short side and ``max_size``, so a crop
    #: view can differ from the full view by a pixel; at test time with the long side uncapped)
    crop_resize: str = "same"
    #: training augmentation: ``"crop_views"`` (CropFormer: full view + one crop) or ``"lsj"``
    #: (the Mask2Former baseline's large-scale jitter: one view, no crop)
    augmentation: str = "crop_views"
    #: large-scale jitter: output size (square) and the range of the random scale
    lsj_image_size: int = 1024
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    #: large-scale jitter: value of the entity masks in the padded area. 0: padding belongs to
    #: no entity (ours); 1: to every entity, as the release (detectron2's ``FixedSizeCrop``
    #: pads masks with 255, so every mask covers the padding and none is ever empty)
    lsj_mask_pad_value: int = 0
    #: keep an entity as a (batch-level) target when no view shows it (the release does);
    #: ``crop_views`` only: ``lsj`` drops empty entities as the release's LSJ mapper does
    keep_invisible_entities: bool = False

    #: The ``data`` config's keys that make the test views, with the release's recipe as the
    #: value of a key left out: what a training checkpoint stores
    #: (``entityseg.models.checkpoint.VIEWS_KEY``), what ``predict``, ``evaluate`` and
    #: ``EntitySegmenter`` take (:meth:`from_keys`, :meth:`to_keys`).
    TEST_KEYS: ClassVar[dict[str, Any]] = {
        "test_short_size": 800,
        "test_max_size": 1333,
        "size_scale": 1.0,
        "crop_delta": 0.7,
        "test_crop_layout": "fixed4",
        "test_crop_resize": "same",
        "pixel_mean": list(IMAGENET_MEAN),
        "pixel_std": list(IMAGENET_STD),
    }

    @classmethod
    def from_keys(
        cls, keys: Mapping[str, Any], others: str = "refuse", prefix: str = "data."
    ) -> ViewConfig:
        """Test views from the ``data`` config's test keys (:attr:`TEST_KEYS`; sizes times
        ``size_scale``), checked once: a bad value raises :class:`ConfigError` naming the key
        (``prefix`` + key). ``others="ignore"`` takes a whole ``data`` config (its training
        keys are left alone); ``"refuse"`` raises on a key that is not a test key."""
        if others == "refuse":
            for key in keys:
                if key not in cls.TEST_KEYS:
                    raise ConfigError(
                        f"{prefix}{key}",
                        keys[key],
                        f"unknown test-view key; expected one of {list(cls.TEST_KEYS)}",
                    )
        values = {**cls.TEST_KEYS, **cls.test_keys_of(keys)}
        _check_test_keys(values, prefix)
        scale = values["size_scale"]
        return cls(
            short_sizes=tuple(scaled_sizes([values["test_short_size"]], scale)),
            max_size=scaled_sizes([values["test_max_size"]], scale)[0],
            crop_layout=values["test_crop_layout"],
            crop_delta=float(values["crop_delta"]),
            flip_prob=0.0,
            pixel_mean=tuple(float(v) for v in values["pixel_mean"]),
            pixel_std=tuple(float(v) for v in values["pixel_std"]),
            crop_resize=values["test_crop_resize"],
        )

    @classmethod
    def test_keys_of(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The test keys a ``data`` config (or a data module's ``hparams``) sets, as json
        values (sequences as lists): what a training checkpoint stores, as configured."""
        keys = {key: data[key] for key in cls.TEST_KEYS if key in data}
        for key in ("pixel_mean", "pixel_std"):
            if isinstance(keys.get(key), Sequence) and not isinstance(keys[key], str):
                keys[key] = list(keys[key])
        return keys

    def to_keys(self) -> dict[str, Any]:
        """The test keys that make these views again, as json values (``size_scale`` 1: the
        sizes as they are)."""
        return {
            "test_short_size": self.short_sizes[0],
            "test_max_size": self.max_size,
            "size_scale": 1.0,
            "crop_delta": self.crop_delta,
            "test_crop_layout": self.crop_layout,
            "test_crop_resize": self.crop_resize,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
        }


CROP_RESIZE_MODES = ("same", "own")
#: Test-time crop layouts: all their crops are used (``random`` is for training only).
TEST_CROP_LAYOUTS = ("fixed4", "fixed8", "grid")


def _check_test_keys(keys: Mapping[str, Any], prefix: str) -> None:
    """Raise :class:`ConfigError` naming the key (``prefix`` + key) of a test-view value that
    cannot work (``keys`` has every test key)."""
    for key in ("test_short_size", "test_max_size"):
        if not (_is_int(keys[key]) and keys[key] > 0):
            raise ConfigError(f"{prefix}{key}", keys[key], "must be a positive integer")
    if not (_is_number(keys["size_scale"]) and keys["size_scale"] > 0):
        raise ConfigError(f"{prefix}size_scale", keys["size_scale"], "must be > 0")
    delta = keys["crop_delta"]
    if not (_is_number(delta) and 0 < delta <= 1):  # every test crop has the one ratio
        raise ConfigError(f"{prefix}crop_delta", delta, "must be in (0, 1]")
    for key, allowed, what in (
        ("test_crop_layout", TEST_CROP_LAYOUTS, "crop layout"),
        ("test_crop_resize", CROP_RESIZE_MODES, "crop resize"),
    ):
        if keys[key] not in allowed:
            raise ConfigError(
                f"{prefix}{key}", keys[key], f"unknown {what}; expected one of {allowed}"
            )
    for key in ("pixel_mean", "pixel_std"):
        values = keys[key]
        three = (
            isinstance(values, Sequence)
            and not isinstance(values, str)
            and len(values) == 3
            and all(_is_number(v) for v in values)
        )
        if not three or (key == "pixel_std" and min(values) <= 0):
            raise ConfigError(f"{prefix}{key}", values, "mean and std need 3 values, std > 0")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


AUGMENTATIONS = ("crop_views", "lsj")

#: Batches are zero-padded at the bottom and right to a multiple of this (the release's 32).
SIZE_DIVISIBILITY = 32


@dataclass
class RenderedViews:
    """The views of one training sample before normalisation: what a release mapper makes.

    ``masks`` hold every entity given, in the given order, also those a view does not show
    (:func:`entity_targets` decides which to keep).
    """

    images: list[np.ndarray]  # V x uint8 [h_v, w_v, 3]
    masks: list[np.ndarray]  # V x uint8 [M, h_v, w_v]
    ids: list[int]  # M annotation ids
    boxes: list[Box]  # V boxes in the (flipped, if flipped) original image's pixels
    image_size: tuple[int, int] | list[tuple[int, int]]  # valid (h, w); one per view if "own"
    orig_size: tuple[int, int]  # (H, W) of the original image
    flipped: bool


class EntityViewsDataset(Dataset):
    """COCO entity images as CropFormer samples.

    Training (``train=True``), ``augmentation="crop_views"``: a random short side from
    ``short_sizes``, a horizontal flip with probability ``flip_prob``, one crop picked from the
    layout (``fixed4`` / ``fixed8``: one of their boxes; ``random``: a random box), and targets
    for both views (:func:`crop_views_sample`). ``augmentation="lsj"``: one large-scale-jitter
    view (:func:`lsj_sample`). Entities that no view shows (too small at this scale, or cut
    away) are left out of the targets unless ``keep_invisible_entities`` and counted in
    ``stats["entity_not_visible"]``. An unreadable image is logged and replaced by the next
    one (counted in the sample's ``num_skipped``) unless ``strict``. ``photometric``: the name
    of a photometric pipeline (:mod:`.photometric`, training only) applied once to the full
    image before its views are cut, drawn from a child of the sample's generator (so the
    geometric draws are the same with and without it); ``None``: off.

    Evaluation (``train=False``): the first short size, all boxes of the layout, no flip, no
    targets; any bad image raises, since skipping it would change the metric.

    A sample is a dict: ``images`` float[V, 3, h, w], ``targets`` (training) a list of V dicts
    with ``masks`` bool[M, h, w] and ``ids`` long[M] (annotation ids, the same order in every
    view), ``crop_boxes`` float[V, 4] in pixels of the original image (mirrored if flipped),
    ``orig_size`` (H, W), ``image_size`` (h, w) (a list of V of them for ``crop_resize="own"``),
    ``image_id``, ``file_name``, ``flipped``, ``num_skipped``.
    """

    def __init__(
        self,
        records: Sequence[EntityImage],
        views: ViewConfig,
        train: bool,
        strict: bool = False,
        seed: int = 0,
        photometric: str | None = None,
    ) -> None:
        if not records:
            raise ValueError("no images to make views of")
        if photometric is not None and (not train or photometric not in PHOTOMETRIC_PIPELINES):
            raise ValueError(
                f"photometric={photometric!r}: expected None, or at training one of "
                f"{PHOTOMETRIC_PIPELINES}"
            )
        if views.crop_resize not in CROP_RESIZE_MODES:
            raise ValueError(
                f"crop_resize={views.crop_resize!r}: expected one of {CROP_RESIZE_MODES}"
            )
        if views.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation={views.augmentation!r}: expected one of {AUGMENTATIONS}"
            )
        self.records = list(records)
        self.views = views
        self.train = train
        self.strict = strict
        self.seed = seed
        self.photometric = photometric
        self._photometric = None if photometric is None else build_photometric(photometric)
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not self.train:
            record = self.records[index]
            sample = prediction_views(
                segmentable(read_entity_image(record), record.path), self.views
            )
            sample.update(image_id=record.image_id, file_name=str(record.path), num_skipped=0)
            return sample
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                sample = self._make_sample(record, self._rng(index))
            except EntityDataError as err:
                if self.strict:
                    raise
                log.warning("skipped: %s", err)
                self.stats["skipped_image"] += 1
                continue
            sample["num_skipped"] = attempt
            return sample
        raise EntityDataError(self.records[index].path, "no readable image in the dataset")

    def _rng(self, index: int) -> np.random.Generator:
        # fresh entropy per call (torch seeds each dataloader worker differently)
        return np.random.default_rng([self.seed, index, int(torch.randint(0, 2**31, ()))])

    def _make_sample(self, record: EntityImage, rng: np.random.Generator) -> dict:
        """A training sample: the random draws here, the making in ``*_sample``."""
        cfg = self.views
        image = segmentable(read_entity_image(record), record.path)
        if self._photometric is not None:  # one draw for every view; spawning a child keeps
            # the geometric draws below the same as without it
            image = apply_photometric(self._photometric, image, rng.spawn(1)[0])
        height, width = image.shape[:2]
        masks = iter_entity_masks(record, strict=self.strict, stats=self.stats)
        if cfg.augmentation == "lsj":  # the release's draw order: flip, scale, crop offset
            flipped = bool(rng.random() < cfg.flip_prob)
            scale = float(rng.uniform(*cfg.lsj_scale))
            resized = lsj_resize_size(height, width, cfg.lsj_image_size, scale)
            offset = lsj_crop_offset(resized, cfg.lsj_image_size, float(rng.random()))
            sample = lsj_sample(
                image, masks, cfg, flipped=flipped, resized=resized, offset=offset, stats=self.stats
            )
        else:  # the release's draw order: short side, flip, crop index
            short = int(rng.choice(cfg.short_sizes))
            flipped = bool(rng.random() < cfg.flip_prob)
            # the grid of the flipped image (same size): a box in the flipped image's pixels
            boxes = crop_boxes(height, width, cfg.crop_layout, cfg.crop_delta, rng=rng)
            box = boxes[int(rng.integers(len(boxes)))]
            sample = crop_views_sample(
                image, masks, cfg, short=short, flipped=flipped, crop_box=box, stats=self.stats
            )
        sample.update(image_id=record.image_id, file_name=str(record.path), num_skipped=0)
        return sample


def segmentable(image: np.ndarray, path: str | Path) -> np.ndarray:
    """``image`` (read from ``path``), checked to be large enough to segment
    (:func:`check_image_size`); an :class:`EntityDataError` naming the file otherwise."""
    try:
        check_image_size(*image.shape[:2])
    except ValueError as err:
        raise EntityDataError(path, str(err)) from None
    return image


def render_crop_views(
    image: np.ndarray,
    masks: EntityMasks,
    *,
    short: int,
    max_size: int,
    flipped: bool,
    crop_box: Box,
    crop_resize: str = "same",
) -> RenderedViews:
    """The full view I^O and one crop view I^C of an image, deterministic, uint8.

    ``image`` uint8 RGB ``[H, W, 3]``; ``masks`` the entities as ``(id, mask [H, W])`` pairs
    (a generator is read once, one mask at a time). ``short`` / ``max_size`` size the full view
    by its shortest edge (detectron2's ``ResizeShortestEdge``). ``crop_box`` (x0, y0, x1, y1)
    is in the pixels of the image AFTER the flip (the release's ``crop_region``). The crop view
    is resized to the full view's size (``crop_resize="same"``) or by its own shortest edge
    with the same ``short`` and ``max_size`` (``"own"``, the release's training views).

    With the release's draws this gives its ``entity_crop`` views exactly (pixels and masks).
    """
    if crop_resize not in CROP_RESIZE_MODES:
        raise ValueError(f"crop_resize={crop_resize!r}: expected one of {CROP_RESIZE_MODES}")
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop box {tuple(crop_box)} is not inside an image of {width}x{height}")
    boxes: list[Box] = [(0, 0, width, height), (x0, y0, x1, y1)]
    full_size = shortest_edge_size(height, width, short, max_size)
    if crop_resize == "same":
        sizes = [full_size, full_size]
    else:
        sizes = [full_size, shortest_edge_size(y1 - y0, x1 - x0, short, max_size)]
    images = [
        crop_and_resize(image, box, size, flip=flipped)
        for box, size in zip(boxes, sizes, strict=True)
    ]
    ids: list[int] = []
    per_view: list[list[np.ndarray]] = [[] for _ in boxes]
    for ann_id, mask in masks:
        ids.append(int(ann_id))
        for kept, box, size in zip(per_view, boxes, sizes, strict=True):
            view = crop_and_resize(mask[None], box, size, is_mask=True, flip=flipped)[0]
            kept.append(view.astype(np.uint8, copy=False))  # [h_v, w_v]
    return RenderedViews(
        images=images,
        masks=[_stack(kept, size) for kept, size in zip(per_view, sizes, strict=True)],
        ids=ids,
        boxes=boxes,
        image_size=full_size if crop_resize == "same" else sizes,
        orig_size=(height, width),
        flipped=flipped,
    )


def render_lsj_view(
    image: np.ndarray,
    masks: EntityMasks,
    *,
    flipped: bool,
    resized: tuple[int, int],
    offset: tuple[int, int],
    image_size: int,
    mask_pad_value: int = 0,
) -> RenderedViews:
    """The one large-scale-jitter view of an image, deterministic, uint8 (V = 1).

    Flip, resize the whole image to ``resized`` (h, w), crop ``image_size`` square from
    ``offset`` (y0, x0), pad to ``image_size`` square with 128 (masks with
    ``mask_pad_value``): the release's ``coco_instance_lsj`` with the draws it recorded as
    ``ResizeTransform(new_h, new_w)`` and ``CropTransform(x0, y0)`` (see :mod:`.lsj`).
    ``image_size`` of the result is the valid (h, w) region, the rest is padding; the box is
    the whole image (the view shows part of it, scaled: LSJ has no crop view to relate to).
    """
    height, width = image.shape[:2]
    ids: list[int] = []
    kept: list[np.ndarray] = []
    for ann_id, mask in masks:
        ids.append(int(ann_id))
        view = lsj_masks(mask[None], flipped, resized, offset, image_size, mask_pad_value)[0]
        kept.append(view.astype(np.uint8, copy=False))  # [S, S]
    return RenderedViews(
        images=[lsj_image(image, flipped, resized, offset, image_size)],
        masks=[_stack(kept, (image_size, image_size))],
        ids=ids,
        boxes=[(0, 0, width, height)],
        image_size=lsj_valid_size(resized, offset, image_size),
        orig_size=(height, width),
        flipped=flipped,
    )


def crop_views_sample(
    image: np.ndarray,
    masks: EntityMasks,
    cfg: ViewConfig,
    *,
    short: int,
    flipped: bool,
    crop_box: Box,
    stats: Counter | None = None,
) -> dict:
    """A CropFormer training sample (V = 2) from its draws: :func:`render_crop_views` with
    ``cfg.max_size`` and ``cfg.crop_resize``, then normalised, with targets
    (:func:`entity_targets`, ``cfg.keep_invisible_entities``). No ``image_id`` etc."""
    views = render_crop_views(
        image,
        masks,
        short=short,
        max_size=cfg.max_size,
        flipped=flipped,
        crop_box=crop_box,
        crop_resize=cfg.crop_resize,
    )
    return training_sample(views, cfg, keep_invisible=cfg.keep_invisible_entities, stats=stats)


def lsj_sample(
    image: np.ndarray,
    masks: EntityMasks,
    cfg: ViewConfig,
    *,
    flipped: bool,
    resized: tuple[int, int],
    offset: tuple[int, int],
    stats: Counter | None = None,
) -> dict:
    """A large-scale-jitter training sample (V = 1) from its draws: :func:`render_lsj_view`
    at ``cfg.lsj_image_size``, normalised (the 128 padding becomes ``(128 - mean) / std``),
    with targets; entities the crop leaves empty are dropped, as the release's
    ``filter_empty_instances`` does (with ``cfg.lsj_mask_pad_value=1``, as released, every
    mask covers the padding, so only an image filling the whole square can lose one)."""
    views = render_lsj_view(
        image,
        masks,
        flipped=flipped,
        resized=resized,
        offset=offset,
        image_size=cfg.lsj_image_size,
        mask_pad_value=cfg.lsj_mask_pad_value,
    )
    return training_sample(views, cfg, keep_invisible=False, stats=stats)


def training_sample(
    views: RenderedViews,
    cfg: ViewConfig,
    keep_invisible: bool = False,
    stats: Counter | None = None,
) -> dict:
    """Normalise rendered views and attach their targets: a sample without ``image_id`` etc.

    Views of different sizes (``"own"``) are zero-padded at the bottom and right, after
    normalisation, to the largest; so are their target masks.
    """
    sample = _sample(views.images, views.boxes, views.image_size, views.flipped, cfg)
    pad_h, pad_w = sample["images"].shape[-2:]
    targets = entity_targets(views.masks, views.ids, keep_invisible=keep_invisible, stats=stats)
    for target in targets:
        target["masks"] = _pad(target["masks"], pad_h, pad_w)
    sample["targets"] = targets
    return sample


def entity_targets(
    view_masks: Sequence[MaskArray],
    ids: Sequence[int] | torch.Tensor,
    keep_invisible: bool = False,
    valid: Sequence[Sequence[int] | np.ndarray | torch.Tensor] | None = None,
    *,
    stats: Counter | None = None,
) -> list[dict]:
    """Per-view targets ``{"masks": bool[M', h_v, w_v], "ids": long[M']}`` from per-view masks.

    ``view_masks``: one ``[M, h_v, w_v]`` stack per view (bool or uint8, numpy or torch; views
    may differ in size), row m of every view the entity ``ids[m]``. ``valid``: optional per-view
    ``[M]`` flags; a mask whose flag is 0 is zeroed in that view (the release's
    ``gt_boxes_valid``). Every view keeps the same M' entities in the same order, so an id
    links one entity across views (batch-level ground truth); an entity whose mask is empty in
    every view is dropped (counted in ``stats["entity_not_visible"]``) unless
    ``keep_invisible``, which the release does for its batch-level targets.
    """
    ids_tensor = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(-1)  # [M]
    count = ids_tensor.shape[0]
    if valid is not None and len(valid) != len(view_masks):
        raise ValueError(f"{len(valid)} valid flag sets for {len(view_masks)} views")
    masks = []
    for v, view in enumerate(view_masks):
        tensor = torch.as_tensor(view).bool()  # [M, h_v, w_v]
        if tensor.dim() != 3 or tensor.shape[0] != count:
            raise ValueError(f"view {v} masks {tuple(tensor.shape)} do not match {count} ids")
        if valid is not None:
            flags = torch.as_tensor(np.asarray(valid[v])).reshape(-1).bool()  # [M]
            if flags.shape[0] != count:
                raise ValueError(f"view {v} has {flags.shape[0]} valid flags for {count} ids")
            tensor = tensor & flags[:, None, None]
        masks.append(tensor)
    if keep_invisible or not masks:
        keep = torch.ones(count, dtype=torch.bool)
    else:
        keep = torch.stack([m.flatten(1).any(1) for m in masks]).any(0)  # [M]
    if stats is not None:
        stats["entity_not_visible"] += int((~keep).sum())
    kept_ids = ids_tensor[keep]
    return [{"masks": m[keep], "ids": kept_ids} for m in masks]


def _stack(masks: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """``[M, h, w]`` uint8 of a list of ``[h, w]`` masks (``[0, h, w]`` when there are none)."""
    return np.stack(masks) if masks else np.zeros((0, *size), dtype=np.uint8)


def prediction_views(image: np.ndarray, views: ViewConfig) -> dict:
    """The test-time sample of any RGB image (``predict`` on user photos): I^O and its crops.

    With ``views.crop_resize == "own"`` the views differ in size: they are zero-padded (after
    normalisation) to a common size and ``image_size`` lists each view's valid ``(h, w)``.
    """
    if views.crop_resize not in CROP_RESIZE_MODES:
        raise ValueError(f"crop_resize={views.crop_resize!r}: expected one of {CROP_RESIZE_MODES}")
    height, width = image.shape[:2]
    short = views.short_sizes[0]
    size = shortest_edge_size(height, width, short, views.max_size)
    boxes = [(0, 0, width, height), *crop_boxes(height, width, views.crop_layout, views.crop_delta)]
    if views.crop_resize == "same":
        return _sample(
            [crop_and_resize(image, box, size) for box in boxes], boxes, size, False, views
        )
    sizes = [size] + [
        shortest_edge_size(y1 - y0, x1 - x0, short, _UNCAPPED) for x0, y0, x1, y1 in boxes[1:]
    ]
    sample = _sample(
        [crop_and_resize(image, box, s) for box, s in zip(boxes, sizes, strict=True)],
        boxes,
        sizes,
        False,
        views,
    )
    return sample


_UNCAPPED = 1 << 30  # no limit on the long side


def _sample(
    images: Sequence[np.ndarray],
    boxes: Sequence[Box],
    size: tuple[int, int] | list[tuple[int, int]],
    flipped: bool,
    cfg: ViewConfig,
) -> dict:
    """The image part of a sample: normalised views zero-padded to one size, their boxes
    (already in the flipped image's pixels if flipped), sizes."""
    width = boxes[0][2]
    normalized = [normalize(v, cfg.pixel_mean, cfg.pixel_std) for v in images]
    pad_h, pad_w = max(v.shape[-2] for v in normalized), max(v.shape[-1] for v in normalized)
    return {
        "images": torch.stack([_pad(v, pad_h, pad_w) for v in normalized]),
        "crop_boxes": torch.tensor([tuple(b) for b in boxes], dtype=torch.float32),  # [V, 4]
        "orig_size": (boxes[0][3], width),
        "image_size": size,
        "flipped": flipped,
    }


def collate_views(samples: list[dict], size_divisibility: int = SIZE_DIVISIBILITY) -> dict:
    """Stack samples into a batch, zero-padding at the bottom/right to a multiple of 32.

    Batch: ``images`` float[N, V, 3, H, W]; ``targets`` list[N] of list[V] of dicts with
    ``masks`` bool[M, H, W] and ``ids`` long[M] (training only); ``crop_boxes`` float[N, V, 4];
    ``image_sizes`` long[N, 2] the valid (h, w) region of every view (long[N, V, 2] for views of
    different sizes, ``crop_resize="own"``; for LSJ, V = 1, the image content inside the
    128-padded square); ``orig_sizes`` long[N, 2];
    ``image_ids`` long[N]; ``file_names``; ``flipped`` bool[N]; ``num_skipped`` (int).
    """
    if len({s["images"].shape[0] for s in samples}) != 1:
        raise ValueError("samples of one batch must have the same number of views")
    d = size_divisibility
    pad_h = -(-max(s["images"].shape[-2] for s in samples) // d) * d
    pad_w = -(-max(s["images"].shape[-1] for s in samples) // d) * d
    batch = {
        "images": torch.stack([_pad(s["images"], pad_h, pad_w) for s in samples]),
        "crop_boxes": torch.stack([s["crop_boxes"] for s in samples]),
        "image_sizes": torch.tensor([s["image_size"] for s in samples], dtype=torch.long),
        "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.long),
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
        "file_names": [s["file_name"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
        "num_skipped": sum(s["num_skipped"] for s in samples),
    }
    if "targets" in samples[0]:
        batch["targets"] = [
            [{"masks": _pad(t["masks"], pad_h, pad_w), "ids": t["ids"]} for t in s["targets"]]
            for s in samples
        ]
    return batch


def _pad(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the last two dims at the bottom and right to ``height`` x ``width``."""
    dh, dw = height - tensor.shape[-2], width - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (0, dw, 0, dh)) if dh or dw else tensor
