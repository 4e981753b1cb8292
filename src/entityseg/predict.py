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

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track

from entityseg.api import EntitySegmenter
from entityseg.atomic_checkpoint import fsync_folder
from entityseg.config import CONFIG_DIR, exits_on_config_error
from entityseg.data.coco_entity import IMAGE_SUFFIXES, read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.data.rle import describe
from entityseg.data.views import segmentable
from entityseg.evaluate import check_modes, segmenter_from_config
from entityseg.evaluation.entity_ap import read_ground_truth
from entityseg.inference.cuda_graphs import check_cuda_graphs
from entityseg.inference.fusion import Entities
from entityseg.inference.runner import check_precision, resolve_view_chunk

log = logging.getLogger(__name__)

#: The incremental results: a settings line, then one line per finished image.
RESULTS_NAME = "predictions.jsonl"
#: The COCO results of every image, assembled from :data:`RESULTS_NAME` at the end.
PREDICTIONS_NAME = "predictions.json"
#: How many skipped photos the last line names (each has its own log line).
SHOWN_SKIPS = 10


def find_images(pattern: str) -> list[Path]:
    """An image file, every image of a folder (sorted), or the files matching a glob.

    Stops with one line when there is nothing to predict (an empty folder, no match).
    """
    path = Path(pattern)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            suffixes = " ".join(sorted(IMAGE_SUFFIXES))
            raise SystemExit(
                f"input={pattern}: no image ({suffixes}) in this folder: nothing to do"
            )
        return images
    if path.is_file():
        return [path]
    matches = sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if p.is_file())
    if not matches:
        raise SystemExit(
            f"input={pattern}: no such file or folder, no file matches it: nothing to do"
        )
    return matches


def check_unique_stems(paths: list[Path]) -> None:
    """Stop in one line if two inputs would write the same ``<stem>.png``."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise SystemExit(
                f"input: {seen[path.stem]} and {path} would both write {path.stem}.png: "
                "predict them into different output= folders"
            )
        seen[path.stem] = path


def image_ids_from_gt(gt_json: str | None) -> dict[str, int]:
    """File name -> image id of the entity ground truth ``gt_json`` (empty without one).

    The file is read and checked as AP^e reads it
    (:func:`~entityseg.evaluation.entity_ap.read_ground_truth`), and each image needs a
    ``file_name`` whose name is its own: a problem raises :class:`EntityDataError`, one line
    naming the file.
    """
    if gt_json is None:
        return {}
    ids: dict[str, int] = {}
    for image in read_ground_truth(gt_json)["images"]:
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not Path(file_name).name:
            raise EntityDataError(
                gt_json,
                f"image {image['id']}: 'file_name' must be a file name, not {describe(file_name)}",
            )
        name = Path(file_name).name
        if name in ids:
            raise EntityDataError(
                gt_json, f"images {ids[name]} and {image['id']} are both named {name!r}"
            )
        ids[name] = int(image["id"])
    return ids


def picture_paths(out_dir: Path, stem: str) -> tuple[Path, Path]:
    """The entity-id PNG and the overlay JPEG of an image."""
    return out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg"


def _save_then_rename(picture: Image.Image, path: Path, image_format: str, **options) -> None:
    """Write ``path`` under a temporary name, on disk (fsynced) before it is renamed, so that
    it is either whole or absent, also after a power cut."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        picture.save(f, format=image_format, **options)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_pictures(image: np.ndarray, entities: Entities, out_dir: Path, stem: str) -> np.ndarray:
    """The entity-id PNG (``Entities.to_id_map``) and the overlay JPEG (``Entities.overlay``,
    crops drawn) of an image; returns the overlay."""
    id_map = entities.to_id_map()
    png, overlay_jpg = picture_paths(out_dir, stem)
    _save_then_rename(Image.fromarray(id_map), png, "PNG")  # uint16 -> 16-bit PNG
    overlay = entities.overlay(image, id_map=id_map)
    _save_then_rename(Image.fromarray(overlay), overlay_jpg, "JPEG", quality=90)
    fsync_folder(out_dir)
    return overlay


def prediction_records(entities: Entities, image_id: int, file_name: str) -> list[dict]:
    """An image's records of ``predictions.json``: COCO results with its file name."""
    return [{**record, "file_name": file_name} for record in entities.to_coco(image_id)]


def file_identity(path: Path) -> dict:
    """What tells one file from another for resuming: its resolved path, size and
    modification time (a file replaced or edited under the same name is another file)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_settings(cfg: DictConfig, segmenter: EntitySegmenter) -> dict:
    """What makes one run's predictions differ from another's, as json values: the
    checkpoint file (:func:`file_identity`: retrained under the same name, it is another),
    ``gt`` and the segmenter's settings (the mode and views it uses)."""
    settings = {
        "checkpoint": file_identity(Path(cfg.ckpt_path)),
        "gt": str(Path(cfg.gt).resolve()) if cfg.gt is not None else None,
        **segmenter.settings(),
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


@dataclass(frozen=True)
class Recorded:
    """An image that ``predictions.jsonl`` records: its id, the byte offset of its line and
    the :func:`file_identity` of the photo it was predicted from."""

    image_id: int
    offset: int
    source: dict | None


def read_results(path: Path, settings: dict) -> dict[str, Recorded]:
    """The images that ``predictions.jsonl`` records, by file name; a later line of a name
    replaces an earlier one.

    Starts the file (its settings line) when it is new or records nothing. A last line without
    its newline (cut by a kill) is removed. Stops with one line when the recorded images were
    made with other ``settings``.
    """
    records: dict[str, Recorded] = {}
    stored, end = None, 0
    if path.is_file():
        with open(path, "rb") as f:
            first = f.readline()
            if first.endswith(b"\n"):
                try:
                    stored = json.loads(first)["settings"]
                except (ValueError, KeyError, TypeError):
                    raise SystemExit(
                        f"{path}: first line is not the settings of entityseg.predict: "
                        "use another output= or delete the file"
                    ) from None
                end = len(first)
                for line in f:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        record = json.loads(line)
                        records[record["file_name"]] = Recorded(
                            int(record["image_id"]), end, record.get("source")
                        )
                    except (ValueError, KeyError, TypeError):
                        log.warning(
                            "%s: unreadable line at byte %d, its image is predicted again",
                            path,
                            end,
                        )
                    end += len(line)
    if not records:  # nothing to keep: (re)start the file with these settings
        path.write_bytes(json.dumps({"settings": settings}).encode() + b"\n")
        return {}
    if stored != settings:
        changed = ", ".join(
            f"{key}: {stored.get(key)} -> {settings.get(key)}"
            for key in sorted(stored.keys() | settings.keys())
            if stored.get(key) != settings.get(key)
        )
        raise SystemExit(
            f"output={path.parent} holds predictions made with other settings ({changed}): "
            f"use another output= or delete {path} to start again"
        )
    if end < path.stat().st_size:
        os.truncate(path, end)
    return records


def is_done(record: Recorded | None, path: Path, out_dir: Path) -> bool:
    """Whether ``path`` was predicted already: recorded from this very file (not another of
    its name, nor an older version of it) with both its pictures on disk."""
    return (
        record is not None
        and record.source == file_identity(path)
        and all(f.is_file() for f in picture_paths(out_dir, path.stem))
    )


def append_result(results: BinaryIO, path: Path, image_id: int, predictions: list) -> Recorded:
    """Append one finished image to ``predictions.jsonl`` and flush it to disk."""
    offset = results.tell()
    source = file_identity(path)
    record = {
        "file_name": path.name,
        "image_id": image_id,
        "source": source,
        "predictions": predictions,
    }
    results.write(json.dumps(record).encode() + b"\n")
    results.flush()
    os.fsync(results.fileno())
    return Recorded(image_id, offset, source)


def write_predictions(
    results_path: Path, records: dict[str, Recorded], paths: list[Path], out: Path
) -> tuple[int, int]:
    """``predictions.json``: the recorded predictions of ``paths``, in their order, one image's
    line at a time. Returns (entities, images) written."""
    partial = out.with_name(f".{out.name}.partial")
    num_entities = num_images = 0
    with open(results_path, "rb") as src, open(partial, "w") as dst:
        dst.write("[")
        for path in paths:
            if path.name not in records:
                continue
            src.seek(records[path.name].offset)
            for prediction in json.loads(src.readline())["predictions"]:
                dst.write((", " if num_entities else "") + json.dumps(prediction))
                num_entities += 1
            num_images += 1
        dst.write("]")
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(partial, out)
    fsync_folder(out.parent)
    return num_entities, num_images


def check_outputs_spare_inputs(out_dir: Path, paths: list[Path], *others: str | None) -> None:
    """Stop in one line when a file this run writes would be one of its inputs (a photo, the
    checkpoint, ``gt``): ``input=D output=D`` would replace ``D/photo.png`` by its id map."""
    inputs = {p.resolve(): p for p in [*paths, *(Path(o) for o in others if o)]}
    outputs = [out_dir / RESULTS_NAME, out_dir / PREDICTIONS_NAME]
    outputs += [picture for p in paths for picture in picture_paths(out_dir, p.stem)]
    for output in outputs:
        for written in (output, output.with_name(f".{output.name}.partial")):
            if written.resolve() in inputs:
                raise SystemExit(
                    f"output={out_dir}: predict would write {written}, which is the input "
                    f"{inputs[written.resolve()]}: choose another output= folder"
                )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    check_modes([cfg.inference.mode])
    check_precision(cfg.inference.precision)
    check_cuda_graphs(cfg.inference.cuda_graphs)
    resolve_view_chunk(cfg.inference.view_chunk, "cpu")  # checked now, resolved per device
    paths = find_images(cfg.input)
    check_unique_stems(paths)
    out_dir = Path(cfg.output)
    check_outputs_spare_inputs(out_dir, paths, cfg.ckpt_path, cfg.gt)
    try:
        known_ids = image_ids_from_gt(cfg.gt)
    except EntityDataError as err:
        raise SystemExit(f"gt={cfg.gt}: {err}") from None
    segmenter = segmenter_from_config(cfg)
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
                image_id = _image_id(index + 1, path.name, records, ids_taken)
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


def _image_id(
    position: int, file_name: str, records: dict[str, Recorded], ids_taken: dict[int, str]
) -> int:
    """An image's id without ``gt=``: the one recorded for it, else its position in the input
    (from 1), else, when a recorded image of another name holds that (the input changed between
    runs), the next id above every one taken."""
    if file_name in records:
        return records[file_name].image_id
    image_id = position
    if ids_taken.get(image_id, file_name) != file_name:
        image_id = max(ids_taken) + 1
    ids_taken[image_id] = file_name
    return image_id


if __name__ == "__main__":
    main()
