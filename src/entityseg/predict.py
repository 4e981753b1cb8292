"""Entity masks for your own images: one photo, a folder tree, a glob or a list of a million.

``python -m entityseg.predict ckpt_path=... input=<image | folder | glob | list.txt>
output=<folder> [input_recursive=true] [inference.mode=batch_oc]`` writes, per image, under
the subfolders it has in the input (``a/1.jpg`` and ``b/1.jpg`` do not clash):
``<stem>_entities.png`` (16-bit entity-id map, 0 = none, 1 = the highest-scoring entity) and
``<stem>_overlay.jpg`` (coloured entities with outlines and the crop boxes), as
``save_pictures=all|id_map|none`` asks; with ``output_format=per_image``, ``<stem>.json`` in
SA-1B's layout. At the end ``predictions.json`` holds the COCO results (with ``file_name``,
RLE and score; with ``gt=<coco json>`` the image ids follow that json) of every image, in
input order; ``merge=false`` leaves the shards as the product, with ``predictions.index.json``.

The run is Lightning's ``Trainer.predict`` (:mod:`entityseg.inference.module`): one process by
default, on ``inference.device``; ``trainer=ddp trainer.devices=8 trainer.num_nodes=4`` under
``torchrun`` or ``srun`` (``trainer=ddp_cpu``: two CPU processes) splits the images into
disjoint shares. Photos are decoded and viewed in ``data.num_workers`` loader workers,
``inference.batch_size`` at a time. Each process appends each finished image to its own
``predictions.rank<r>.jsonl`` (synced to disk after the image's outputs, which are written
whole or not at all: :mod:`entityseg.inference.shards`). A photo that fails (unreadable, not
one of the formats of :data:`~entityseg.data.coco_entity.IMAGE_FORMATS`, a decompression bomb,
too small to segment) is reported in one line naming it and skipped, the others are
predicted, and the exit code is 1 at the end. An input without images, two images whose
outputs would clash (``1.jpg`` and ``1.png`` in one folder), or an output that would write
over an input file (``input=D output=D``) stops at once with one line (exit code 1), as does
a ``gt`` that is not a COCO json. ``inference.precision=bf16`` and ``model.compile=true`` as
in ``entityseg.evaluate``.

Predictions are what :class:`~entityseg.api.EntitySegmenter` gives for the photo. The test
views (sizes, crops, delta, normalisation) and ``inference.compat`` are the checkpoint's, so
``ckpt_path=`` alone predicts as the model was validated (a converted release checkpoint: as
the release, ``compat=release``). ``data.<test key>=...`` given on the command line
(``test_short_size``, ``test_max_size``, ``size_scale``, ``crop_delta``, ``test_crop_layout``,
``test_crop_resize``, ``pixel_mean``, ``pixel_std``), e.g. ``data.test_crop_layout=fixed8``,
replaces that one setting; values from ``experiment=`` or a ``data=`` config do not. A
checkpoint that stores no test views (written before they were stored) takes the ``data``
config's.

Interrupted runs resume, with any number of processes: an image is done when the latest
line of it in any shard is done, recorded from the same file (its resolved path, size and
modification time: another folder's ``photo.png``, or the photo edited since, is predicted
again) and its outputs exist, so an output or a line half-written by a killed run never
counts. A rerun with the same ``output=`` predicts only the rest (one log line says how many
were done) and ``predictions.json`` is assembled from the shards, every image of ``input``
once, in input order, exactly as an uninterrupted run writes it. A shard's first line holds
the settings that change the results (the checkpoint file's path, size and modification
time, ``gt``, mode, fusion and the test views used): resuming with other settings stops with
one line naming them, rather than mix two models' predictions in one folder. A process that
dies stops the run (the launcher names its rank: Lightning's, ``torchrun``, ``srun
--kill-on-bad-exit``); the shards keep every image finished until then.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import replace
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from entityseg.api import EntitySegmenter, segmenter_from_config
from entityseg.config import CONFIG_DIR, ConfigError, exits_on_config_error
from entityseg.data.errors import EntityDataError
from entityseg.inference.inputs import (
    Inputs,
    check_outputs_spare_inputs,
    check_unique_outputs,
    find_inputs,
)
from entityseg.inference.module import SegmenterModule, inference_trainer
from entityseg.inference.predict_run import Outputs, PhotoDataModule, RunProgress, ShardWriter
from entityseg.inference.settings import InferenceSettings
from entityseg.inference.shards import (
    INDEX_NAME,
    PREDICTIONS_NAME,
    RunSummary,
    file_identity,
    merge_shards,
    read_shards,
    shard_path,
    write_index,
)
from entityseg.inference.writing import PICTURES, image_ids_from_gt

log = logging.getLogger(__name__)

#: How many skipped photos the last line names (each has its own log line).
SHOWN_SKIPS = 10
#: ``inference.compare``'s counts per image and over the input.
COMPARISON_NAME = "comparison.json"
#: ``output_format``: COCO results only, or also one json per image (SA-1B's layout).
OUTPUT_FORMATS = ("coco", "per_image")


def run_settings(cfg: DictConfig, segmenter: EntitySegmenter) -> dict:
    """What makes one run's predictions differ from another's, as json values: the
    weights' file (:func:`file_identity` of the checkpoint, or of a model folder's
    safetensors: retrained under the same name, it is another),
    ``gt`` and the segmenter's settings (the mode and views it uses)."""
    settings = {
        "checkpoint": file_identity(segmenter.checkpoint),
        "gt": str(Path(cfg.gt).resolve()) if cfg.gt is not None else None,
        **segmenter.settings_record(),
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


def outputs_from_config(cfg: DictConfig, settings: InferenceSettings) -> Outputs:
    """``output``, ``save_pictures``, ``output_format``, ``inference.mode`` and ``compare``
    (and ``merge``, ``input_recursive``), checked before any work."""
    if cfg.save_pictures not in PICTURES:
        raise ConfigError("save_pictures", cfg.save_pictures, f"expected one of {list(PICTURES)}")
    if cfg.output_format not in OUTPUT_FORMATS:
        raise ConfigError("output_format", cfg.output_format, f"expected one of {OUTPUT_FORMATS}")
    for key in ("merge", "input_recursive"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(key, cfg[key], "must be true or false")
    return Outputs(
        Path(cfg.output),
        settings.mode,
        cfg.save_pictures,
        cfg.output_format == "per_image",
        settings.compare,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    settings = InferenceSettings.from_config(cfg.inference)  # a bad one stops before any work
    outputs = outputs_from_config(cfg, settings)
    inputs = find_inputs(cfg.input, cfg.input_recursive)
    if inputs.unlisted:
        log.warning(
            "input=%s: %d image(s) in its subfolders are not included (input_recursive=true "
            "includes them)",
            cfg.input,
            inputs.unlisted,
        )
    check_unique_outputs(inputs)
    check_outputs_spare_inputs(
        outputs.folder,
        inputs,
        outputs.relative_of,
        [PREDICTIONS_NAME, INDEX_NAME, COMPARISON_NAME, shard_path(Path(), 0).name],
        others=(cfg.ckpt_path, cfg.gt),
    )
    try:
        known_ids = image_ids_from_gt(cfg.gt)
    except EntityDataError as err:
        raise EntityDataError(f"gt={cfg.gt}", str(err)) from None
    # on the CPU until the trainer places it (every process would load onto one GPU)
    segmenter = segmenter_from_config(cfg, settings.replace(device="cpu"))
    record = run_settings(cfg, segmenter)
    if outputs.folder.is_dir():
        read_shards(outputs.folder, record)  # other settings: one line before any process starts
    outputs.folder.mkdir(parents=True, exist_ok=True)
    datamodule = PhotoDataModule(
        inputs,
        outputs,
        record,
        segmenter.views,
        known_ids,
        cfg.gt,
        batch_size=settings.batch_size,
        num_workers=cfg.data.num_workers,
    )
    modes = list(dict.fromkeys([segmenter.settings.mode, *settings.compare]))
    if segmenter.usable_modes(modes) != modes:
        raise ConfigError("inference.compare", list(settings.compare), "needs the batch decoder")
    outputs = replace(outputs, mode=segmenter.settings.mode)  # image_o for a Mask2Former
    module = SegmenterModule(segmenter.net, segmenter.settings, modes)
    progress = RunProgress(datamodule)
    trainer = inference_trainer(cfg.trainer, settings, [ShardWriter(outputs, record), progress])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    try:
        trainer.strategy.barrier("predicted")
    except RuntimeError as err:  # a process is gone (gloo, NCCL); a launcher may say it first
        stopped = datamodule.stopped_ranks(trainer.world_size)
        raise SystemExit(
            f"rank {', '.join(map(str, stopped)) or '?'} of {trainer.world_size} stopped before "
            f"finishing its share of the images ({str(err).splitlines()[0]}): the shards in "
            f"{outputs.folder} keep every image finished; the same command (with any number "
            "of processes) predicts the rest"
        ) from None
    if not trainer.is_global_zero:
        return
    records = read_shards(outputs.folder, record)
    names = (item.name for item in inputs)
    summary = merge_shards(names, records, outputs.folder / PREDICTIONS_NAME if cfg.merge else None)
    if outputs.compare:
        _write_comparison(outputs, summary)
    if not cfg.merge:
        log.info(
            "wrote %s: the shards hold the predictions",
            write_index(outputs.folder, summary, record),
        )
    seconds = time.perf_counter() - progress.started if progress.started else 0.0
    _report(summary, inputs, len(datamodule.todo), seconds, outputs.folder, trainer)


def _write_comparison(outputs: Outputs, summary: RunSummary) -> None:
    """``comparison.json``: each image's counts of ``inference.compare`` and their sum, and
    the sum in one log line."""
    total = {key: 0 for key in ("matched", "recovered", "merged", "split")}
    for counts in summary.compared.values():
        for key in total:
            total[key] += counts[key]
    baseline, found = outputs.compare
    path = outputs.folder / COMPARISON_NAME
    path.write_text(
        json.dumps(
            {"baseline": baseline, "found": found, "images": summary.compared, "total": total}
        )
    )
    log.info(
        "%s against %s over %d images: %d matched, %d recovered, %d merged, %d split (%s)",
        found,
        baseline,
        len(summary.compared),
        *total.values(),
        path,
    )


def _report(
    summary: RunSummary,
    inputs: Inputs,
    planned: int,
    seconds: float,
    folder: Path,
    trainer: L.Trainer,
) -> None:
    """The summary line (images, skipped, entities; this run's images, time from the start
    of the predict loop, rate, processes, rank 0's peak memory) and the exit of a run that
    left images unpredicted: skipped photos (each logged) or images no shard records, named
    by their paths."""
    total = len(inputs)
    device = trainer.strategy.root_device
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB of GPU memory"
    else:  # ru_maxrss: KiB on Linux
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB resident"
    log.info(
        "%d of %d images predicted (%d entities), %d skipped; this run: %d images in %.1f s "
        "(%.2f images/s, %d process(es)); peak %s on rank 0; outputs in %s",
        summary.images,
        total,
        summary.entities,
        len(summary.skipped),
        planned,
        seconds,
        planned / max(seconds, 1e-9),
        trainer.world_size,
        peak,
        folder,
    )
    if summary.missing:
        raise SystemExit(
            f"{len(summary.missing)} of {total} image(s) have no record in the shards of "
            f"{folder} (a process stopped early?): a rerun predicts them; first: "
            + ", ".join(str(inputs.root / name) for name in summary.missing[:SHOWN_SKIPS])
        )
    if summary.skipped:
        names = [str(inputs.root / name) for name, _ in summary.skipped]
        shown = ", ".join(names[:SHOWN_SKIPS]) + (
            f" and {len(names) - SHOWN_SKIPS} more" if len(names) > SHOWN_SKIPS else ""
        )
        raise SystemExit(
            f"{len(names)} of {total} image(s) skipped, each for the reason logged above "
            f"(the others were predicted; a rerun tries the skipped again): {shown}"
        )


if __name__ == "__main__":
    main()
