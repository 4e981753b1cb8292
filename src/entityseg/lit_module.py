"""LightningModule: CropFormer's training and validation steps, optimiser and logging.

Lightning runs the loops, devices, DDP, precision and gradient clipping (``conf/trainer``);
this module says what one step computes. Training: L = 0.5 L_i + 1.0 L_b (the criterion) on
batches of V = 2 views. Validation and test: every inference mode of ``inference.modes`` is
inferred as ``evaluate`` infers it (:func:`~entityseg.inference.runner.infer_batch`, the same
settings) and scored with AP^e against the data module's json, each mode with its own
DDP-synced :class:`EntityAP`; pictures of the predicted entities (Image-O beside
Batch-OC, crops drawn) go to TensorBoard every ``log_images_every_n_steps`` validation steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

from entityseg.config import ConfigError
from entityseg.data.datamodule import EntityDataModule
from entityseg.data.transforms import denormalize
from entityseg.data.views import ViewConfig
from entityseg.evaluation.entity_ap import EntityAP
from entityseg.inference.runner import infer_batch
from entityseg.inference.settings import InferenceSettings
from entityseg.models.checkpoint import INFERENCE_KEY, NET_CONFIG_KEY, VIEWS_KEY, load_weights
from entityseg.viz import compare_modes, image_grid

log = logging.getLogger(__name__)

#: Parameters of these modules get ``norm_weight_decay`` (torch norm layers) or
#: ``embedding_weight_decay`` (``nn.Embedding``), as detectron2's / the release's optimiser does.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
#: Parameter names without weight decay (Swin's position tables), as the release.
NO_WEIGHT_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


class CropFormerModule(L.LightningModule):
    """Wraps the network (``net``), its criterion, inference and AP^e.

    Args:
        net: :class:`~entityseg.models.cropformer.CropFormer`.
        criterion: :class:`~entityseg.losses.criterion.CropFormerCriterion`.
        optimizer: ``lr``, ``weight_decay``, ``backbone_lr_factor``, ``norm_weight_decay``,
            ``embedding_weight_decay``, ``decayed_norms`` (AdamW groups as released: see
            :func:`parameter_groups`).
        scheduler: ``power`` of the poly schedule over ``trainer.max_steps`` (no warm-up).
        inference: the ``conf/inference`` keys, read once into
            :class:`~entityseg.inference.settings.InferenceSettings` (:attr:`settings`):
            validation and test infer exactly as ``evaluate`` does
            (:func:`~entityseg.inference.runner.infer_batch`), in ``inference.precision``
            whatever ``trainer.precision`` is, and score ``inference.modes``.
        log_images_every_n_steps: validation steps between TensorBoard pictures (0: never).
        pixel_mean, pixel_std: to draw the normalised views.
        backbone: the ``model/backbone`` config choice; it sits at ``model.backbone`` so that
            ``model/backbone=swin_tiny`` selects it, and ``net`` reads it from there. Unused here.
        ops: kernel choices (``ms_deform_attn``: auto | torch | triton), read by net from
            ``model.ops``; unused here.
        compile: ``torch.compile`` the backbone and the pixel decoder
            (:meth:`~entityseg.models.cropformer.CropFormer.compile_parts`; same state dict).
        init_from: a checkpoint to start from (fine-tuning): one of ours or one converted from
            the release (``entityseg.convert_release``). Parts it has no weights for (the
            association module of a Mask2Former checkpoint, the heads of a backbone-only file)
            keep their initialisation; every other tensor must fit.
    """

    def __init__(
        self,
        net: nn.Module,
        criterion: nn.Module,
        optimizer: Mapping,
        scheduler: Mapping,
        inference: Mapping,
        log_images_every_n_steps: int = 10,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
        backbone: Mapping | None = None,
        ops: Mapping | None = None,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "criterion", "backbone", "ops"], logger=False)
        #: how validation and test infer; compat left to the checkpoint (null) is ours
        self.settings = InferenceSettings.from_config(inference)
        self.net = net
        if init_from:
            try:
                fresh = load_weights(self.net, init_from, allow_fresh_parts=True)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError("init_from", init_from, str(err)) from None
            log.info("weights from %s; initialised afresh: %s", init_from, fresh or "nothing")
        if compile:
            self.net.compile_parts()
        self.criterion = criterion
        self.modes = list(self.settings.modes)
        if not self.net.has_batch_decoder:  # the Mask2Former baseline has Image-O only
            self.modes = [m for m in self.modes if m == "image_o"]
        self.metrics = nn.ModuleDict()
        self._nan_warned: set[str] = set()  # metrics already reported as NaN (warned once)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        jsons = {
            "val": datamodule.hparams.val_json,
            "test": datamodule.hparams.test_json or datamodule.hparams.val_json,
        }
        for split, gt_json in jsons.items():
            for mode in self.modes:
                key = f"{split}_{mode}"
                if key not in self.metrics:
                    self.metrics[key] = EntityAP(gt_json, sync_on_compute=True)

    def forward(self, images: torch.Tensor) -> dict:
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.criterion(self.net(batch["images"]), batch["targets"])
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step} "
                f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); "
                "stopping: the last checkpoint before this step is intact"
            )
        size = batch["images"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=size)
        self.log(
            "train/skipped_images", float(batch["num_skipped"]), batch_size=size, reduce_fx="sum"
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_step(batch, batch_idx, "test")

    def _evaluate_step(self, batch: dict, batch_idx: int, split: str) -> None:
        """The inference step of ``evaluate`` (:func:`infer_batch`), with its settings."""
        fused, _ = infer_batch(self.net, batch, self.modes, self.device, self.settings)
        for mode in self.modes:
            results = [
                r
                for image_id, entities in zip(batch["image_ids"].tolist(), fused[mode], strict=True)
                for r in entities.to_coco(image_id)
            ]
            self.metrics[f"{split}_{mode}"].update(results)
        every = self.hparams.log_images_every_n_steps
        if split == "val" and every and batch_idx % every == 0:
            self._log_pictures(batch, fused, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_ap("val")

    def on_test_epoch_end(self) -> None:
        self._log_ap("test")

    def _log_ap(self, split: str) -> None:
        for mode in self.modes:
            metric = self.metrics[f"{split}_{mode}"]
            values = metric.compute()
            for key, name in (("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75")):
                metric_name = f"{split}/{name}_{mode}"
                if math.isnan(values[key]) and metric_name not in self._nan_warned:
                    # logged as NaN, never as a score of 0 that a sweep would take for a result
                    self._nan_warned.add(metric_name)
                    log.warning(
                        "%s is NaN: the %s json has no ground-truth entity to score "
                        "(pycocotools gives -1)",
                        metric_name,
                        split,
                    )
                self.log(metric_name, values[key], sync_dist=False, rank_zero_only=False)
            metric.reset()

    def _log_pictures(self, batch: dict, fused: dict, batch_idx: int) -> None:
        """Each image of the batch: its crops, then the entities of every mode."""
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        tiles = []
        for n in range(batch["images"].shape[0]):
            h, w = batch["image_sizes"][n].tolist()
            full_h, full_w = batch["orig_sizes"][n].tolist()
            view = denormalize(
                batch["images"][n, 0, :, :h, :w].float(),
                self.hparams.pixel_mean,
                self.hparams.pixel_std,
            )
            image = _resize_rgb(view, full_h, full_w)
            per_mode = {mode: fused[mode][n] for mode in self.modes}
            tiles.append(compare_modes(image, per_mode, batch["crop_boxes"][n, 1:].tolist()))
        picture = image_grid(tiles, columns=1)
        experiment.add_image(
            f"val/entities_{batch_idx}", picture, self.global_step, dataformats="HWC"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # predict / evaluate / EntitySegmenter rebuild the network and its test views from
        # these, without the training config
        checkpoint[NET_CONFIG_KEY] = self.net.config
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, EntityDataModule):  # the test views validation used
            checkpoint[VIEWS_KEY] = ViewConfig.test_keys_of(datamodule.hparams)
        checkpoint[INFERENCE_KEY] = self.settings.to_dict()

    def configure_optimizers(self):
        opt = self.hparams.optimizer
        groups = parameter_groups(
            self.net,
            opt["lr"],
            opt["weight_decay"],
            opt["backbone_lr_factor"],
            opt.get("norm_weight_decay", 0.0),
            opt.get("embedding_weight_decay", 0.0),
            opt.get("decayed_norms", ()),
        )
        optimizer = torch.optim.AdamW(groups, lr=opt["lr"], weight_decay=opt["weight_decay"])
        total = max(1, int(self.trainer.max_steps))
        power = self.hparams.scheduler["power"]

        def poly(step: int) -> float:
            return max(0.0, 1.0 - step / total) ** power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def parameter_groups(
    net: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_factor: float,
    norm_weight_decay: float = 0.0,
    embedding_weight_decay: float = 0.0,
    decayed_norms: Sequence[str] = (),
) -> list[dict]:
    """AdamW groups as the release's ``build_optimizer`` makes them.

    Every parameter gets ``lr`` and ``weight_decay``, except: the backbone's lr is multiplied by
    ``backbone_lr_factor``; parameters of torch norm layers get ``norm_weight_decay`` and of
    ``nn.Embedding`` ``embedding_weight_decay``; Swin's ``relative_position_bias_table`` /
    ``absolute_pos_embed`` get none. Everything else is decayed, biases and the pixel decoder's
    ``level_embed`` included. ``decayed_norms``: module-name prefixes (e.g. ``"backbone"``)
    whose norm layers are decayed like any weight: the release's HorNet builds its norms from
    its own LayerNorm class, which its optimiser does not see as a norm.
    """
    settings: dict[int, float] = {}
    for module_name, module in net.named_modules():
        if isinstance(module, NORM_TYPES) and not _under(module_name, decayed_norms):
            decay = norm_weight_decay
        elif isinstance(module, nn.Embedding):
            decay = embedding_weight_decay
        else:
            continue
        settings.update((id(p), decay) for p in module.parameters(recurse=False))
    groups: dict[tuple[float, float], list] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        decay = settings.get(id(param), weight_decay)
        if any(key in name for key in NO_WEIGHT_DECAY_NAMES):
            decay = 0.0
        param_lr = lr * (backbone_lr_factor if name.startswith("backbone.") else 1.0)
        groups.setdefault((param_lr, decay), []).append(param)
    return [
        {"params": params, "lr": param_lr, "weight_decay": decay}
        for (param_lr, decay), params in groups.items()
    ]


def _under(module_name: str, prefixes: Sequence[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def _resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The network's full view back at the original size, for drawing original-size masks."""
    return np.asarray(Image.fromarray(image).resize((width, height)))
