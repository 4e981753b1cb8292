"""Inference on Lightning's ``Trainer.predict``: one process, or many across GPUs and nodes.

``predict`` and ``evaluate`` run a :class:`SegmenterModule` (the segmenter's network, its
settings and modes) under a trainer from :func:`inference_trainer`: the ``trainer=`` groups
training uses choose the processes (``trainer=ddp trainer.devices=8 trainer.num_nodes=4``
under ``torchrun`` or SLURM's ``srun``; ``trainer=ddp_cpu`` for two CPU processes); one
process otherwise, on ``inference.device``. Lightning gives each process a disjoint share of
the images (its unrepeated sampler: no padding duplicates), runs ``predict_step`` under
``torch.inference_mode`` and keeps nothing (``return_predictions=False``): results leave
through callbacks, the shard writer of ``predict`` or the gathered metrics of ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar

from entityseg.config import ConfigError
from entityseg.inference.cuda_graphs import graphed
from entityseg.inference.fusion import Entities
from entityseg.inference.runner import infer_batch
from entityseg.inference.settings import InferenceSettings


@dataclass
class PredictedImage:
    """One image's entities per mode, and what its outputs need: where it came from (its
    name relative to the input and its path; a data set's image: its file name), its id, the
    photo (for the overlay) and the forward time (ms)."""

    name: str
    path: str
    image_id: int
    entities: dict[str, Entities]
    forward_ms: dict[str, float]
    rgb: np.ndarray | None = None


@dataclass
class PredictedBatch:
    """What ``predict_step`` returns: the predicted images and the failure samples
    (:func:`~entityseg.inference.photos.failure`) of one loaded batch."""

    images: list[PredictedImage] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


class SegmenterModule(L.LightningModule):
    """A segmenter's network under Lightning's predict loop: each batch's entities in
    ``modes``, as :meth:`EntitySegmenter.run <entityseg.api.EntitySegmenter.run>` gives them
    (the same :func:`~entityseg.inference.runner.infer_batch`, the same score threshold).

    A batch is a collated test batch (``evaluate``'s loader) or ``groups`` of them with
    ``failures`` (:func:`~entityseg.inference.photos.collate_photos`); each group is one
    forward.
    """

    def __init__(self, net: torch.nn.Module, settings: InferenceSettings, modes: Sequence[str]):
        super().__init__()
        self.net = net.eval()
        self.settings = settings
        self.modes = list(modes)
        self._forward = self.net

    def on_predict_start(self) -> None:
        # after Lightning placed the network: graphs are captured on this process's device
        self._forward = graphed(self.net, self.settings.cuda_graphs, self.device)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> PredictedBatch:
        groups = batch.get("groups", [batch])
        result = PredictedBatch(failures=list(batch.get("failures", [])))
        for group in groups:
            fused, forward_ms = infer_batch(
                self._forward, group, self.modes, self.device, self.settings
            )
            threshold = self.settings.score_threshold
            names = group.get("names", group["file_names"])  # evaluate's: the file names
            count = len(names)
            for n, image_id in enumerate(group["image_ids"].tolist()):
                entities = {mode: fused[mode][n] for mode in self.modes}
                if threshold > 0:
                    entities = {m: e.scoring_at_least(threshold) for m, e in entities.items()}
                result.images.append(
                    PredictedImage(
                        name=names[n],
                        path=group.get("paths", names)[n],
                        image_id=image_id,
                        entities=entities,
                        forward_ms=forward_ms,
                        rgb=group.get("rgbs", [None] * count)[n],
                    )
                )
        return result


def inference_trainer(
    trainer_cfg: Mapping[str, Any], settings: InferenceSettings, callbacks: Sequence[Any]
) -> L.Trainer:
    """A trainer for ``Trainer.predict`` from a ``trainer=`` config.

    Several processes (``devices`` above 1, ``num_nodes`` above 1, or a ``strategy``): the
    config's accelerator, devices, nodes and strategy, with ``inference.device`` left to
    ``auto``. One process: ``inference.device`` places it (``auto``: the first GPU when there
    is one). The trainer's precision is not used: the network runs in ``inference.precision``.
    Nothing is logged, checkpointed or summarised; a progress bar only when ``callbacks``
    hold one.
    """
    devices = trainer_cfg.get("devices", 1)
    num_nodes = trainer_cfg.get("num_nodes", 1)
    strategy = trainer_cfg.get("strategy", "auto")
    several = devices not in (1, [0], "1") or num_nodes != 1 or strategy != "auto"
    if several:
        if settings.device != "auto":
            raise ConfigError(
                "inference.device",
                settings.device,
                "must be auto when trainer= runs several processes (trainer.accelerator and "
                "trainer.devices place them)",
            )
        placement = {
            "accelerator": trainer_cfg.get("accelerator", "auto"),
            "devices": devices,
            "num_nodes": num_nodes,
            "strategy": strategy,
        }
    else:
        device = settings.torch_device()
        placement = {
            "accelerator": "gpu" if device.type == "cuda" else device.type,
            "devices": [device.index or 0] if device.type == "cuda" else 1,
        }
    return L.Trainer(
        **placement,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=None,
    )
