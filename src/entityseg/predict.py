"""Entity masks for your own images.

``python -m entityseg.predict ckpt_path=... input=<image | folder | glob> output=<folder>
[inference.mode=batch_oc] [data.test_crop_layout=fixed8]`` writes, per image, ``<stem>.png``
(16-bit entity-id map, 0 = none, 1 = the highest-scoring entity) and ``<stem>_overlay.jpg``
(coloured entities with outlines and the crop boxes), and one ``predictions.json`` (COCO
results with ``file_name``, RLE and score; with ``gt=<coco json>`` the image ids follow that
json). Unreadable images are reported by name and skipped; the exit code is 1 if any failed.
An input without images, or with two images of one stem (whose pictures would overwrite each
other), stops at once with one line (exit code 1).
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

Interrupted runs resume. Each finished image is appended to ``predictions.jsonl`` (and flushed
to disk) after its two pictures, which are written to a temporary name and then renamed: an
image is done when it has a complete line there and both pictures exist, so a picture or a line
half-written by a killed run never counts. A rerun with the same ``output=`` skips the done
images (one log line says how many) and ``predictions.json`` is assembled from the jsonl at the
end, every image of ``input`` once, in input order, exactly as an uninterrupted run writes it.
The jsonl's first line holds the settings that change the results (checkpoint, ``gt``, mode,
fusion and the test views used): resuming with other settings stops with one line naming them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track

from entityseg.api import EntitySegmenter
from entityseg.config import CONFIG_DIR, exits_on_config_error
from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.evaluate import check_modes, segmenter_from_config
from entityseg.inference.cuda_graphs import check_cuda_graphs
from entityseg.inference.fusion import Entities
from entityseg.inference.runner import check_precision, resolve_view_chunk

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

#: The incremental results: a settings line, then one line per finished image.
RESULTS_NAME = "predictions.jsonl"
#: The COCO results of every image, assembled from :data:`RESULTS_NAME` at the end.
PREDICTIONS_NAME = "predictions.json"


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
    """File name -> image id of a COCO json (empty without one)."""
    if gt_json is None:
        return {}
    images = json.loads(Path(gt_json).read_text())["images"]
    return {Path(img["file_name"]).name: int(img["id"]) for img in images}


def picture_paths(out_dir: Path, stem: str) -> tuple[Path, Path]:
    """The entity-id PNG and the overlay JPEG of an image."""
    return out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg"


def _save_then_rename(picture: Image.Image, path: Path, image_format: str, **options) -> None:
    """Write ``path`` under a temporary name first, so that it is either whole or absent."""
    partial = path.with_name(f".{path.name}.partial")
    picture.save(partial, format=image_format, **options)
    os.replace(partial, path)


def write_pictures(image: np.ndarray, entities: Entities, out_dir: Path, stem: str) -> np.ndarray:
    """The entity-id PNG (``Entities.to_id_map``) and the overlay JPEG (``Entities.overlay``,
    crops drawn) of an image; returns the overlay."""
    id_map = entities.to_id_map()
    png, overlay_jpg = picture_paths(out_dir, stem)
    _save_then_rename(Image.fromarray(id_map), png, "PNG")  # uint16 -> 16-bit PNG
    overlay = entities.overlay(image, id_map=id_map)
    _save_then_rename(Image.fromarray(overlay), overlay_jpg, "JPEG", quality=90)
    return overlay


def prediction_records(entities: Entities, image_id: int, file_name: str) -> list[dict]:
    """An image's records of ``predictions.json``: COCO results with its file name."""
    return [{**record, "file_name": file_name} for record in entities.to_coco(image_id)]


def run_settings(cfg: DictConfig, segmenter: EntitySegmenter) -> dict:
    """What makes one run's predictions differ from another's, as json values: the
    checkpoint, ``gt`` and the segmenter's settings (the mode and views it uses)."""
    settings = {
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "gt": str(Path(cfg.gt).resolve()) if cfg.gt is not None else None,
        **segmenter.settings(),
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back


def read_results(path: Path, settings: dict) -> dict[str, tuple[int, int]]:
    """The images that ``predictions.jsonl`` records: file name -> (image id, byte offset of
    its line); a later line of a name replaces an earlier one.

    Starts the file (its settings line) when it is new or records nothing. A last line without
    its newline (cut by a kill) is removed. Stops with one line when the recorded images were
    made with other ``settings``.
    """
    records: dict[str, tuple[int, int]] = {}
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
                        records[record["file_name"]] = (int(record["image_id"]), end)
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


def append_result(results: BinaryIO, file_name: str, image_id: int, predictions: list) -> int:
    """Append one finished image to ``predictions.jsonl`` and flush it to disk; its offset."""
    offset = results.tell()
    record = {"file_name": file_name, "image_id": image_id, "predictions": predictions}
    results.write(json.dumps(record).encode() + b"\n")
    results.flush()
    os.fsync(results.fileno())
    return offset


def write_predictions(
    results_path: Path, records: dict[str, tuple[int, int]], paths: list[Path], out: Path
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
            src.seek(records[path.name][1])
            for prediction in json.loads(src.readline())["predictions"]:
                dst.write((", " if num_entities else "") + json.dumps(prediction))
                num_entities += 1
            num_images += 1
        dst.write("]")
    os.replace(partial, out)
    return num_entities, num_images


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    check_modes([cfg.inference.mode])
    check_precision(cfg.inference.precision)
    check_cuda_graphs(cfg.inference.cuda_graphs)
    resolve_view_chunk(cfg.inference.view_chunk, "cpu")  # checked now, resolved per device
    paths = find_images(cfg.input)
    check_unique_stems(paths)
    segmenter = segmenter_from_config(cfg)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_NAME
    records = read_results(results_path, run_settings(cfg, segmenter))
    done = {
        p.name
        for p in paths
        if p.name in records and all(f.is_file() for f in picture_paths(out_dir, p.stem))
    }
    if records:
        log.info(
            "resuming %s: %d of %d images already done, skipped",
            results_path,
            len(done),
            len(paths),
        )
    todo = [(index, p) for index, p in enumerate(paths) if p.name not in done]
    known_ids = image_ids_from_gt(cfg.gt)
    ids_taken = {image_id: name for name, (image_id, _) in records.items()}

    failed = []
    with open(results_path, "ab") as results:
        for index, path in track(todo, description="predicting"):
            try:
                image = read_rgb_image(path)
            except EntityDataError as err:
                log.error("skipped: %s", err)
                failed.append(path)
                continue
            if known_ids and path.name not in known_ids:
                log.error("skipped: %s: not an image of gt=%s", path, cfg.gt)
                failed.append(path)
                continue
            if known_ids:
                image_id = known_ids[path.name]
            else:
                image_id = _image_id(index + 1, path.name, records, ids_taken)
            entities = segmenter(image)
            write_pictures(image, entities, out_dir, path.stem)
            predictions = prediction_records(entities, image_id, path.name)
            offset = append_result(results, path.name, image_id, predictions)
            records[path.name] = (image_id, offset)
    num_entities, num_images = write_predictions(
        results_path, records, paths, out_dir / PREDICTIONS_NAME
    )
    log.info("wrote %d entities of %d images to %s", num_entities, num_images, out_dir)
    if failed:
        raise SystemExit(
            f"{len(failed)} image(s) could not be read: " + ", ".join(str(p) for p in failed)
        )


def _image_id(
    position: int, file_name: str, records: dict[str, tuple[int, int]], ids_taken: dict[int, str]
) -> int:
    """An image's id without ``gt=``: the one recorded for it, else its position in the input
    (from 1), else, when a recorded image of another name holds that (the input changed between
    runs), the next id above every one taken."""
    if file_name in records:
        return records[file_name][0]
    image_id = position
    if ids_taken.get(image_id, file_name) != file_name:
        image_id = max(ids_taken) + 1
    ids_taken[image_id] = file_name
    return image_id


if __name__ == "__main__":
    main()
