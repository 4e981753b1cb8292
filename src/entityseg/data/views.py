"""One image -> the CropFormer input views I = {I^O, I^C} and their per-view entity targets.

A sample holds ``V`` views of one image, each resized to the same network size ``(h, w)``:
view 0 is the full image I^O, views 1.. the crops I^C (one random crop at train time, the k
fixed crops at test time). Entity masks go through exactly the same crop and resize, one mask
at a time, so that a 4000 x 3000 photo with hundreds of entities stays in memory.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from entityseg.data.coco_entity import EntityImage, iter_entity_masks, read_entity_image
from entityseg.data.crops import Box, crop_and_resize, crop_boxes
from entityseg.data.errors import EntityDataError
from entityseg.data.transforms import flip_box, hflip, normalize, shortest_edge_size

log = logging.getLogger(__name__)


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
    #: test-time crop sizes: ``"same"`` every view at the full view's size (ours); ``"own"``
    #: each crop resized by its own shortest edge, long side uncapped (the release's test views)
    crop_resize: str = "same"


CROP_RESIZE_MODES = ("same", "own")

#: Batches are zero-padded at the bottom and right to a multiple of this (the release's 32).
SIZE_DIVISIBILITY = 32


class EntityViewsDataset(Dataset):
    """COCO entity images as CropFormer samples.

    Training (``train=True``): a random short side from ``short_sizes``, one crop picked from
    the layout (``fixed4`` / ``fixed8``: one of their boxes; ``random``: a random box), a
    horizontal flip of both views with probability ``flip_prob``, and targets for both views.
    Entities that no view shows after resizing (too small at this scale) are left out of the
    targets and counted in ``stats["entity_not_visible"]``. An unreadable image is logged and
    replaced by the next one (counted in the sample's ``num_skipped``) unless ``strict``.

    Evaluation (``train=False``): the first short size, all boxes of the layout, no flip, no
    targets; any bad image raises, since skipping it would change the metric.

    A sample is a dict: ``images`` float[V, 3, h, w], ``targets`` (training) a list of V dicts
    with ``masks`` bool[M, h, w] and ``ids`` long[M] (annotation ids, the same order in every
    view), ``crop_boxes`` float[V, 4] in pixels of the original image (mirrored if flipped),
    ``orig_size`` (H, W), ``image_size`` (h, w), ``image_id``, ``file_name``, ``flipped``,
    ``num_skipped``.
    """

    def __init__(
        self,
        records: Sequence[EntityImage],
        views: ViewConfig,
        train: bool,
        strict: bool = False,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("no images to make views of")
        self.records = list(records)
        self.views = views
        self.train = train
        self.strict = strict
        self.seed = seed
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not self.train:
            record = self.records[index]
            sample = prediction_views(read_entity_image(record), self.views)
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
        """A training sample: random short side, one crop, maybe flipped, with targets."""
        cfg = self.views
        image = read_entity_image(record)
        height, width = image.shape[:2]
        size = shortest_edge_size(height, width, int(rng.choice(cfg.short_sizes)), cfg.max_size)
        boxes = crop_boxes(height, width, cfg.crop_layout, cfg.crop_delta, rng=rng)
        boxes = [(0, 0, width, height), boxes[int(rng.integers(len(boxes)))]]
        flipped = bool(rng.random() < cfg.flip_prob)

        views = [crop_and_resize(image, box, size) for box in boxes]
        view_masks, ids = self._targets(record, boxes, size)
        if flipped:  # mirror I^O, I^C and their masks together, as the release does
            views, view_masks = zip(*map(hflip, views, view_masks), strict=True)
        sample = _sample(views, boxes, size, flipped, cfg)
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        sample.update(
            image_id=record.image_id,
            file_name=str(record.path),
            num_skipped=0,
            targets=[
                {"masks": torch.from_numpy(masks).bool(), "ids": ids_tensor} for masks in view_masks
            ],
        )
        return sample

    def _targets(
        self, record: EntityImage, boxes: list[Box], size: tuple[int, int]
    ) -> tuple[list[np.ndarray], list[int]]:
        """Masks uint8 [M, h, w] of every view, and the M annotation ids they share."""
        ids, per_view = [], [[] for _ in boxes]
        for ann_id, mask in iter_entity_masks(record, strict=self.strict, stats=self.stats):
            views = [crop_and_resize(mask[None], box, size, is_mask=True)[0] for box in boxes]
            if not any(view.any() for view in views):
                self.stats["entity_not_visible"] += 1
                continue
            ids.append(ann_id)
            for kept, view in zip(per_view, views, strict=True):
                kept.append(view)
        empty = np.zeros((0, *size), dtype=np.uint8)
        return [np.stack(v) if v else empty for v in per_view], ids


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


def _sample(images, boxes, size, flipped: bool, cfg: ViewConfig) -> dict:
    """The image part of a sample: normalised views, their boxes (mirrored if flipped), sizes."""
    width = boxes[0][2]
    normalized = [normalize(v, cfg.pixel_mean, cfg.pixel_std) for v in images]
    pad_h, pad_w = max(v.shape[-2] for v in normalized), max(v.shape[-1] for v in normalized)
    return {
        "images": torch.stack([_pad(v, pad_h, pad_w) for v in normalized]),
        "crop_boxes": torch.tensor(
            [flip_box(b, width) if flipped else b for b in boxes], dtype=torch.float32
        ),
        "orig_size": (boxes[0][3], width),
        "image_size": size,
        "flipped": flipped,
    }


def collate_views(samples: list[dict], size_divisibility: int = SIZE_DIVISIBILITY) -> dict:
    """Stack samples into a batch, zero-padding at the bottom/right to a multiple of 32.

    Batch: ``images`` float[N, V, 3, H, W]; ``targets`` list[N] of list[V] of dicts with
    ``masks`` bool[M, H, W] and ``ids`` long[M] (training only); ``crop_boxes`` float[N, V, 4];
    ``image_sizes`` long[N, 2] the valid (h, w) region of every view (long[N, V, 2] for views of
    different sizes, ``crop_resize="own"``); ``orig_sizes`` long[N, 2];
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
