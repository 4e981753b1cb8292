"""Writing predictions: pictures, COCO records, and the resumable record of a long run.

What ``python -m entityseg.predict`` and the web app write for an image: its 16-bit entity-id
PNG and overlay JPEG (:func:`write_pictures`, each written whole or not at all) and its COCO
results (:func:`prediction_records`). A run over many photos appends each finished image to
``predictions.jsonl`` (:func:`append_result`, synced to disk), so that a rerun skips what is
done (:func:`read_results`, :func:`is_done`) and ``predictions.json`` is assembled from it
(:func:`write_predictions`). Inputs and outputs that cannot work raise :class:`InputError`, one
line; the command line turns it into its exit.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from entityseg.atomic_checkpoint import fsync_folder
from entityseg.config import UserError
from entityseg.data.coco_entity import IMAGE_SUFFIXES
from entityseg.data.errors import EntityDataError
from entityseg.data.rle import describe
from entityseg.evaluation.entity_ap import read_ground_truth
from entityseg.inference.fusion import Entities

log = logging.getLogger(__name__)

#: The incremental results: a settings line, then one line per finished image.
RESULTS_NAME = "predictions.jsonl"
#: The COCO results of every image, assembled from :data:`RESULTS_NAME` at the end.
PREDICTIONS_NAME = "predictions.json"


class InputError(UserError):
    """An input or output of a prediction run that cannot work (nothing to predict, two
    photos of one name, an output over an input, a results file of other settings)."""


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: whole or absent."""
    return path.with_name(f".{path.name}.partial")


def find_images(pattern: str) -> list[Path]:
    """An image file, every image of a folder (sorted), or the files matching a glob.

    Stops with one line when there is nothing to predict (an empty folder, no match).
    """
    path = Path(pattern)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            suffixes = " ".join(sorted(IMAGE_SUFFIXES))
            raise InputError(
                f"input={pattern}: no image ({suffixes}) in this folder: nothing to do"
            )
        return images
    if path.is_file():
        return [path]
    matches = sorted(p for p in map(Path, glob.glob(pattern, recursive=True)) if p.is_file())
    if not matches:
        raise InputError(
            f"input={pattern}: no such file or folder, no file matches it: nothing to do"
        )
    return matches


def check_unique_stems(paths: list[Path]) -> None:
    """Stop in one line if two inputs would write the same ``<stem>.png``."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise InputError(
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
    partial = partial_path(path)
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
                    raise InputError(
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
        raise InputError(
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
    partial = partial_path(out)
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
        for written in (output, partial_path(output)):
            if written.resolve() in inputs:
                raise InputError(
                    f"output={out_dir}: predict would write {written}, which is the input "
                    f"{inputs[written.resolve()]}: choose another output= folder"
                )


def image_id_for(
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
