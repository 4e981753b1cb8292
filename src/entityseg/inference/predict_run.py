"""The parts of a dataset-scale ``predict`` run around Lightning's predict loop.

:class:`PhotoDataModule` plans the run on every process alike (which inputs no shard holds
yet, and their image ids) and loads those photos in workers; :class:`ShardWriter` writes each
image's outputs and its shard line as the batch ends; :class:`RunProgress` shows one bar on
rank 0 for the images of all processes, counted from the shards' new lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from entityseg.data.views import ViewConfig
from entityseg.inference.compare import compare_entities
from entityseg.inference.inputs import Inputs
from entityseg.inference.module import PredictedBatch
from entityseg.inference.photos import PhotoDataset, collate_photos
from entityseg.inference.shards import (
    Recorded,
    ShardLines,
    append_done,
    append_skipped,
    is_done,
    open_shard,
    read_shards,
)
from entityseg.inference.writing import (
    output_paths,
    prediction_records,
    write_comparison,
    write_image_json,
    write_pictures,
)
from entityseg.viz import compare_modes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where and what a run writes: its folder, the mode written, the pictures (``all``,
    ``id_map``, ``none``), whether each image gets a json of its own
    (``output_format=per_image``), and the two modes put side by side (``inference.compare``:
    baseline first), if any."""

    folder: Path
    mode: str = "batch_oc"
    save_pictures: str = "all"
    per_image: bool = False
    compare: tuple[str, ...] = ()

    def of(self, name: str) -> list[Path]:
        """Every file written for the input ``name`` (``a/1.jpg``)."""
        return self._paths(self.folder, name)

    def relative_of(self, name: str) -> list[str]:
        """:meth:`of`, relative to :attr:`folder` (posix)."""
        return [p.as_posix() for p in self._paths(Path(), name)]

    def _paths(self, folder: Path, name: str) -> list[Path]:
        stem = _stem(name)
        return output_paths(folder, stem, self.save_pictures, self.per_image, bool(self.compare))

    @property
    def needs_photo(self) -> bool:
        """Whether the photo itself travels with its entities (to draw on it)."""
        return self.save_pictures == "all" or bool(self.compare)


def _stem(name: str) -> str:
    """An input's name without its suffix, subfolders kept: ``a/1`` for ``a/1.jpg``."""
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def plan_run(
    inputs: Inputs, outputs: Outputs, records: dict[str, Recorded], known_ids: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The input positions still to predict and their image ids, the same on every process.

    An image is done when its latest shard line is done, from the same photo, with its
    outputs on disk (:func:`~entityseg.inference.shards.is_done`). Image ids: ``gt``'s (by
    file name), else the recorded one, else the input position (from 1), else (a recorded
    image of another name holds that id: the input changed between runs) the next id above
    every one taken.
    """
    todo, ids = [], []
    taken = {r.image_id: name for name, r in records.items() if r.done}
    above = max(taken, default=0)
    for index, item in enumerate(inputs):
        record = records.get(item.name)
        if is_done(record, item.path, outputs.of(item.name)):
            continue
        if known_ids:
            image_id = known_ids.get(item.path.name, 0)
        elif record is not None and record.done:
            image_id = record.image_id
        elif taken.get(index + 1, item.name) == item.name:
            image_id = index + 1
        else:
            above = max(above, len(inputs)) + 1
            image_id = above
        todo.append(index)
        ids.append(image_id)
    return np.asarray(todo, dtype=np.int64), np.asarray(ids, dtype=np.int64)


class PhotoDataModule(L.LightningDataModule):
    """The photos a run still has to predict, loaded in ``num_workers`` workers,
    ``batch_size`` at a time.

    ``setup`` plans the run on every process (:func:`plan_run`, read only) and then waits for
    all of them, so that no process reads a shard another has begun to append to.
    """

    def __init__(
        self,
        inputs: Inputs,
        outputs: Outputs,
        settings_record: dict,
        views: ViewConfig,
        known_ids: Mapping[str, int],
        gt: str | None,
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.outputs = outputs
        self.settings_record = settings_record
        self.views = views
        self.known_ids = known_ids
        self.gt = gt
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.todo = np.zeros(0, dtype=np.int64)
        self.lines: ShardLines | None = None

    def setup(self, stage: str) -> None:
        records = read_shards(self.outputs.folder, self.settings_record)
        todo, ids = plan_run(self.inputs, self.outputs, records, self.known_ids)
        self.todo = todo
        self.lines = ShardLines(self.outputs.folder)  # before any process appends
        if records and (self.trainer is None or self.trainer.is_global_zero):
            log.info(
                "resuming %s: %d of %d images already done, skipped",
                self.outputs.folder,
                len(self.inputs) - len(todo),
                len(self.inputs),
            )
        self.dataset = PhotoDataset(
            self.inputs,
            todo,
            ids,
            self.views,
            keep_image=self.outputs.needs_photo,
            allowed=set(self.known_ids) if self.known_ids else None,
            allowed_by=f"gt={self.gt}",
        )
        if self.trainer is not None:
            self.trainer.strategy.barrier("planned")

    def stopped_ranks(self, world_size: int) -> list[int]:
        """The processes whose shards gained fewer lines than their share of the planned
        images (rank ``r`` predicts positions ``r, r + world_size, ...``: Lightning's
        unrepeated sampler)."""
        planned = len(self.todo)
        return [
            rank
            for rank in range(world_size)
            if self.lines.of_rank(rank) < len(range(rank, planned, world_size))
        ]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_photos,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )


class ShardWriter(BasePredictionWriter):
    """Each image's outputs (pictures, its json), then its line in this process's shard; a
    failed photo's one line in the log and in the shard."""

    def __init__(self, outputs: Outputs, settings_record: dict) -> None:
        super().__init__(write_interval="batch")
        self.outputs = outputs
        self.settings_record = settings_record
        self.shard = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shard = open_shard(self.outputs.folder, trainer.global_rank, self.settings_record)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: PredictedBatch,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self.outputs.folder
        for failed in prediction.failures:
            log.error("skipped: %s", failed["failure"])
            append_skipped(self.shard, failed["name"], failed["failure"])
        for image in prediction.images:
            entities = image.entities[self.outputs.mode]
            stem = _stem(image.name)
            write_pictures(image.rgb, entities, folder, stem, self.outputs.save_pictures)
            if self.outputs.per_image:
                write_image_json(entities, folder, stem, image.image_id, image.name)
            counts = None
            if self.outputs.compare:
                baseline, found = (image.entities[mode] for mode in self.outputs.compare)
                compared = compare_entities(found, baseline)
                pair = dict(zip(self.outputs.compare, (baseline, found), strict=True))
                picture = compare_modes(image.rgb, pair, found.crop_boxes.tolist())
                write_comparison(picture, folder, stem)
                counts = compared.counts()
            records = prediction_records(entities, image.image_id, image.name)
            append_done(self.shard, image.name, Path(image.path), image.image_id, records, counts)


class RunProgress(L.Callback):
    """One bar on rank 0 for the whole run: images finished or skipped by every process
    (the shards' new lines), of those planned, and images per second."""

    def __init__(self, datamodule: PhotoDataModule, every_s: float = 0.5) -> None:
        self.datamodule = datamodule
        self.every_s = every_s
        self._progress: Progress | None = None
        self._last = 0.0
        #: when the predict loop began (every process up, the network placed)
        self.started: float | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if not trainer.is_global_zero:
            return
        self._progress = Progress(
            TextColumn("predicting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("predicting", total=len(self.datamodule.todo), rate="")
        self._progress.start()

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None and time.perf_counter() - self._last >= self.every_s:
            self._update()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._progress is not None:
            self._update()
            self._progress.stop()
            self._progress = None

    def _update(self) -> None:
        self._last = time.perf_counter()
        done = self.datamodule.lines.total()
        rate = done / max(self._last - self.started, 1e-9)
        self._progress.update(self._task, completed=done, rate=f"{rate:.2f} images/s")
