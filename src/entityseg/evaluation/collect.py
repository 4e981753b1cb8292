"""Gathering ``evaluate``'s entities from every process, to score them once on rank 0.

:class:`ModeCollector` keeps each mode's COCO results in an
:class:`~entityseg.evaluation.entity_ap.EntityAP` (the metric validation gathers with: RLEs
as tensors, ``cat``-reduced across processes) and the forward times in a ``CatMetric``.
:meth:`ModeCollector.gathered` syncs them and puts each mode's results back in the data set's
image order, so that ``predictions_<mode>.json`` and AP^e are those of one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import CatMetric

from entityseg.evaluation.entity_ap import EntityAP
from entityseg.inference.module import PredictedBatch


class ModeCollector(L.Callback):
    """Each mode's COCO results and per-image forward times (ms), on every process."""

    def __init__(self, modes: Sequence[str], gt_json: str | Path) -> None:
        self.modes = list(modes)
        self.results = {mode: EntityAP(gt_json) for mode in self.modes}
        self.forward_ms = {mode: CatMetric() for mode in self.modes}

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for mode in self.modes:  # on the device the process group gathers on
            self.results[mode].to(pl_module.device).update([])  # typed state on every rank
            self.forward_ms[mode].to(pl_module.device).update(torch.zeros(0, dtype=torch.float64))

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: PredictedBatch,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for mode in self.modes:
            self.results[mode].update(
                [
                    r
                    for image in outputs.images
                    for r in image.entities[mode].to_coco(image.image_id)
                ]
            )
            times = [image.forward_ms[mode] for image in outputs.images]
            self.forward_ms[mode].update(torch.tensor(times, dtype=torch.float64))

    def gathered(
        self, image_order: Sequence[int]
    ) -> tuple[dict[str, list[dict]], dict[str, list[float]]]:
        """Every process's results per mode, in ``image_order`` (the data set's image ids;
        an image's own results keep their order), and the forward times; call it on every
        process (it syncs them)."""
        position = {image_id: k for k, image_id in enumerate(image_order)}
        predictions, forward_ms = {}, {}
        for mode in self.modes:
            with self.results[mode].sync_context():
                gathered = self.results[mode].predictions()
            predictions[mode] = sorted(gathered, key=lambda r: position[r["image_id"]])
            forward_ms[mode] = self.forward_ms[mode].compute().flatten().tolist()
        return predictions, forward_ms
