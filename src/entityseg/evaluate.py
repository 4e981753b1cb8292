"""Evaluate a checkpoint: AP^e of every inference mode, like the paper's Table 7.

``python -m entityseg.evaluate ckpt_path=... [data=...] [inference.modes=[image_o,batch_oc]]``
writes to its output folder one COCO results json per mode (``predictions_<mode>.json``),
``table7.md`` and ``table7.json`` (AP^e, AP^e_50, AP^e_75 and the median forward time per
image, data loading excluded). ``inference.precision=bf16`` runs the network under bf16
autocast; ``model.compile=true`` compiles its backbone and pixel decoder (``torch.compile``).
A progress bar follows the network over the images; then one log line names each mode as
pycocotools scores it.

The run is Lightning's ``Trainer.predict``, as ``predict``'s: one process by default;
``trainer=ddp`` (``torchrun``, ``srun``) or ``trainer=ddp_cpu`` share the images between
processes, whose results are gathered to rank 0 and scored there once, in the data set's
image order: the same predictions and AP^e as one process. Batches are ``data.val_batch_size``
images, as validation's.

The images and annotations come from ``data``; the test views (sizes, crops, normalisation)
and ``inference.compat`` from the checkpoint, as :class:`~entityseg.api.EntitySegmenter` reads
them: ``data.<test key>=...`` given on the command line (e.g. ``data.test_crop_layout=fixed8``)
overrides the checkpoint's, and a checkpoint that stores no views takes the ``data`` config's.
``ckpt_path`` may name a released model or a Hub repository (``ckpt_path=cropformer_hornet_3x``).
``update_card=true`` puts this evaluation's AP^e into the model card beside the checkpoint (the
``README.md`` training wrote beside it, or a model folder's).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig

from entityseg.api import segmenter_from_config
from entityseg.config import CONFIG_DIR, exits_on_config_error, instantiate_checked
from entityseg.data.errors import EntityDataError
from entityseg.evaluation.collect import ModeCollector
from entityseg.evaluation.entity_ap import metrics_json
from entityseg.evaluation.table7 import flat_metrics, markdown_table, table_rows
from entityseg.hub.card import card_beside, metrics_by_mode, refresh_card_metrics
from entityseg.hub.run_card import dataset_name
from entityseg.inference.module import SegmenterModule, inference_trainer
from entityseg.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exits_on_config_error
def main(cfg: DictConfig) -> float:
    settings = InferenceSettings.from_config(cfg.inference)  # a bad one stops before any work
    # on the CPU until the trainer places it (every process would load onto one GPU)
    segmenter = segmenter_from_config(cfg, settings.replace(device="cpu"))
    # the data set of ``data``, viewed as the segmenter views images
    view_keys = segmenter.views.to_keys()
    datamodule = instantiate_checked(cfg.data, "data", for_training=False, **view_keys)
    gt_json = datamodule.hparams.test_json or datamodule.hparams.val_json
    modes = segmenter.usable_modes(segmenter.settings.modes)
    collector = ModeCollector(modes, gt_json)
    trainer = inference_trainer(cfg.trainer, settings, [collector, RichProgressBar()])
    module = SegmenterModule(segmenter.net, segmenter.settings, modes)
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except EntityDataError as err:  # AP^e over fewer images would not be AP^e: stop, name it
        raise EntityDataError("evaluation stopped", str(err)) from None
    image_order = [record.image_id for record in datamodule.datasets["test"].records]
    predictions, forward_ms = collector.gathered(image_order)
    if not trainer.is_global_zero:
        return float("nan")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(predictions, forward_ms, gt_json, out_dir)
    (out_dir / "table7.json").write_text(metrics_json(rows, indent=2))
    metrics = flat_metrics(rows)
    (out_dir / "metrics.json").write_text(metrics_json(metrics, indent=2, sort_keys=True))
    (out_dir / "table7.md").write_text(markdown_table(rows))
    print(markdown_table(rows))
    log.info("wrote %s", out_dir / "table7.md")
    if cfg.update_card:
        card = refresh_card_metrics(
            card_beside(segmenter.checkpoint), metrics_by_mode(metrics), dataset_name(cfg.data)
        )
        log.info("model card %s: AP^e of this evaluation", card)
    return rows[-1]["AP"]


if __name__ == "__main__":
    main()
