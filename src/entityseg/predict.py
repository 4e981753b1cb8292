"""Entity masks for your own images.

``python -m entityseg.predict ckpt_path=... input=<image | folder | glob> output=<folder>
[inference.mode=batch_oc] [data.test_crop_layout=fixed8]`` writes, per image, ``<stem>.png``
(16-bit entity-id map, 0 = none, 1 = the highest-scoring entity) and ``<stem>_overlay.jpg``
(coloured entities with outlines and the crop boxes), and one ``predictions.json`` (COCO
results with ``file_name``, RLE and score; with ``gt=<coco json>`` the image ids follow that
json). A photo that fails (unreadable, not one of the formats of
:data:`~entityseg.data.coco_entity.IMAGE_FORMATS`, a decompression bomb, too small to segment)
is reported in one line naming it and skipped, the others are predicted, and the exit code is
1 at the end. An input without images, two images of one stem (whose pictures would overwrite
each other), or an output that would write over an input file (``input=D output=D``) stops at
once with one line (exit code 1), as does a ``gt`` that is not a COCO json.
``inference.precision=bf16`` and ``model.compile=true`` as in ``entityseg.evaluate``.

Predictions go through :class:`~entityseg.api.EntitySegmenter`, as ``EntitySegmenter(photo)``
would give them. The test views (sizes, crops, delta, normalisation) and ``inference.compat``
are the checkpoint's, so ``ckpt_path=`` alone predicts as the model was validated (a converted
release checkpoint: as the release, ``compat=release``). ``data.<test key>=...`` given on the
command line (``test_short_size``, ``test_max_size``, ``size_scale``, ``crop_delta``,
``test_crop_layout``, ``test_crop_resize``, ``pixel_mean``, ``pixel_std``), e.g.
``data.test_crop_layout=fixed8``, replaces that one setting; values from ``experiment=`` or a
``data=`` config do not. A checkpoint that stores no test views (written before they were
stored) takes the ``data`` config's.

Interrupted runs resume. Each finished image is appended to ``predictions.jsonl`` (and synced
to disk) after its two pictures, which are written to a temporary name, synced and then
renamed: an image is done when it has a complete line there, recorded from the same file (its
resolved path, size and modification time: another folder's ``photo.png``, or the photo edited
since, is predicted again) and both pictures exist, so a picture or a line half-written by a
killed run never counts. A rerun with the same ``output=`` skips the done images (one log line
says how many) and ``predictions.json`` is assembled from the jsonl at the end, every image of
``input`` once, in input order, exactly as an uninterrupted run writes it. The jsonl's first
line holds the settings that change the results (the checkpoint file's path, size and
modification time, ``gt``, mode, fusion and the test views used): resuming with other settings
stops with one line naming them, rather than mix two models' predictions in one folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.progress import track

from entityseg.api import EntitySegmenter, segmenter_from_config
from entityseg.config import CONFIG_DIR, exits_on_config_error
from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.data.views import segmentable
from entityseg.inference.settings import InferenceSettings
from entityseg.inference.writing import (
    PREDICTIONS_NAME,
    RESULTS_NAME,
    append_result,
    check_outputs_spare_inputs,
    check_unique_stems,
    file_identity,
    find_images,
    image_id_for,
    image_ids_from_gt,
    is_done,
    prediction_records,
    read_results,
    write_pictures,
    write_predictions,
)

log = logging.getLogger(__name__)

#: How many skipped photos the last line names (each has its own log line).
SHOWN_SKIPS = 10


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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    settings = InferenceSettings.from_config(cfg.inference)  # a bad one stops before any work
    paths = find_images(cfg.input)
    check_unique_stems(paths)
    out_dir = Path(cfg.output)
    check_outputs_spare_inputs(out_dir, paths, cfg.ckpt_path, cfg.gt)
    try:
        known_ids = image_ids_from_gt(cfg.gt)
    except EntityDataError as err:
        raise EntityDataError(f"gt={cfg.gt}", str(err)) from None
    segmenter = segmenter_from_config(cfg, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_NAME
    records = read_results(results_path, run_settings(cfg, segmenter))
    done = {p.name for p in paths if is_done(records.get(p.name), p, out_dir)}
    if records:
        log.info(
            "resuming %s: %d of %d images already done, skipped",
            results_path,
            len(done),
            len(paths),
        )
    todo = [(index, p) for index, p in enumerate(paths) if p.name not in done]
    ids_taken = {record.image_id: name for name, record in records.items()}

    failed = []
    with open(results_path, "ab") as results:
        for index, path in track(todo, description="predicting"):
            if known_ids and path.name not in known_ids:
                failed.append(_skipped(path, f"{path}: not an image of gt={cfg.gt}"))
                continue
            try:  # unreadable or too small to segment: an EntityDataError naming the photo
                image = segmentable(read_rgb_image(path), path)
                entities = segmenter(image)
            except EntityDataError as err:
                failed.append(_skipped(path, str(err)))
                continue
            except Exception as err:  # one photo's failure must not stop the others
                log.debug("%s failed", path, exc_info=True)
                reason = str(err).splitlines()[0] if str(err) else ""
                failed.append(_skipped(path, f"{path}: {type(err).__name__}: {reason}"))
                continue
            if known_ids:
                image_id = known_ids[path.name]
            else:
                image_id = image_id_for(index + 1, path.name, records, ids_taken)
            write_pictures(image, entities, out_dir, path.stem)  # on disk before its line
            predictions = prediction_records(entities, image_id, path.name)
            records[path.name] = append_result(results, path, image_id, predictions)
    num_entities, num_images = write_predictions(
        results_path, records, paths, out_dir / PREDICTIONS_NAME
    )
    log.info("wrote %d entities of %d images to %s", num_entities, num_images, out_dir)
    if failed:
        shown = ", ".join(failed[:SHOWN_SKIPS]) + (
            f" and {len(failed) - SHOWN_SKIPS} more" if len(failed) > SHOWN_SKIPS else ""
        )
        raise SystemExit(
            f"{len(failed)} of {len(paths)} image(s) skipped, each for the reason logged above "
            f"(the others were predicted; a rerun tries the skipped again): {shown}"
        )


def _skipped(path: Path, problem: str) -> str:
    """Log why a photo is skipped, in one line; its name for the summary."""
    log.error("skipped: %s", problem)
    return str(path)


if __name__ == "__main__":
    main()
