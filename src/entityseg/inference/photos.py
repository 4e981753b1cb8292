"""Photos as test samples, made in DataLoader workers: what ``predict`` feeds the network.

:class:`PhotoDataset` decodes a user's photo and makes its views (I^O and its crops,
:func:`~entityseg.data.views.prediction_views`) in a loader worker, so the decode overlaps the
network. A photo that cannot be read is not an exception that would stop every process: it
becomes a failure sample naming it (:func:`failure`), which the writer records as skipped.
:func:`collate_photos` groups a loaded batch by network input size, so that images go through
the network together only when none of them needs padding to another's size (padding would
change its entities): a batch of any size gives the entities of one image at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.data.views import (
    SIZE_DIVISIBILITY,
    ViewConfig,
    collate_views,
    prediction_views,
    segmentable,
)
from entityseg.inference.inputs import Inputs

log = logging.getLogger(__name__)


def failure(name: str, problem: str) -> dict:
    """The sample of a photo that cannot be predicted: which, and why (one line)."""
    return {"name": name, "failure": problem}


class PhotoDataset(Dataset):
    """The photos ``todo`` of ``inputs`` (input positions), with image ids ``image_ids``.

    A sample: ``images`` float[V, 3, h, w] and the rest of
    :func:`~entityseg.data.views.prediction_views`, plus ``name`` (relative to the input),
    ``path``, ``image_id`` and, with ``keep_image``, the photo itself (``rgb`` uint8
    [H, W, 3], for its overlay); or a :func:`failure`. ``allowed``: when given (``gt=``), the
    file names that may be predicted (``allowed_by`` names where they come from).
    """

    def __init__(
        self,
        inputs: Inputs,
        todo: np.ndarray,
        image_ids: np.ndarray,
        views: ViewConfig,
        keep_image: bool,
        allowed: set[str] | None = None,
        allowed_by: str = "",
    ) -> None:
        self.inputs = inputs
        self.todo = todo
        self.image_ids = image_ids
        self.views = views
        self.keep_image = keep_image
        self.allowed = allowed
        self.allowed_by = allowed_by

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, position: int) -> dict:
        index = int(self.todo[position])
        item = self.inputs[index]
        if self.allowed is not None and item.path.name not in self.allowed:
            return failure(item.name, f"{item.path}: not an image of {self.allowed_by}")
        try:  # unreadable or too small to segment: an EntityDataError naming the photo
            image = segmentable(read_rgb_image(item.path), item.path)
            sample = prediction_views(image, self.views)
        except EntityDataError as err:
            return failure(item.name, str(err))
        except Exception as err:  # one photo's failure must not stop the others
            log.debug("%s failed", item.path, exc_info=True)
            reason = str(err).splitlines()[0] if str(err) else ""
            return failure(item.name, f"{item.path}: {type(err).__name__}: {reason}")
        sample.update(
            name=item.name,
            path=str(item.path),
            image_id=int(self.image_ids[position]),
            file_name=item.name,
            num_skipped=0,
        )
        if self.keep_image:
            sample["rgb"] = image
        return sample


def input_size(sample: dict) -> tuple[int, ...]:
    """The network input shape one sample alone is collated to: views, padded height, width."""
    views, _, height, width = sample["images"].shape
    d = SIZE_DIVISIBILITY
    return views, -(-height // d) * d, -(-width // d) * d


def collate_photos(samples: Sequence[dict]) -> dict:
    """A loaded batch: ``groups``, the samples of each network input size collated
    (:func:`~entityseg.data.views.collate_views`, plus their ``names``, ``paths`` and
    ``rgbs``), in the order each size first appears; and the ``failures``."""
    by_size: dict[tuple[int, ...], list[dict]] = {}
    failures = []
    for sample in samples:
        if "failure" in sample:
            failures.append(sample)
        else:
            by_size.setdefault(input_size(sample), []).append(sample)
    groups = []
    for group in by_size.values():
        batch = collate_views(group)
        batch.update(
            names=[s["name"] for s in group],
            paths=[s["path"] for s in group],
            rgbs=[s.get("rgb") for s in group],
        )
        groups.append(batch)
    return {"groups": groups, "failures": failures}
