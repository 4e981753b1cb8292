"""Writing predictions: pictures, COCO records, and an image's json.

What ``python -m entityseg.predict`` and the web app write for an image: its 16-bit entity-id
PNG and overlay JPEG (:func:`write_pictures`, each written whole or not at all), its COCO
results (:func:`prediction_records`) and, with ``output_format=per_image``, a json of its own
in SA-1B's layout (:func:`write_image_json`). The record of a long run is in
:mod:`~entityseg.inference.shards`. Inputs and outputs that cannot work raise
:class:`InputError`, one line; the command line turns it into its exit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from entityseg.atomic_checkpoint import fsync_folder
from entityseg.config import UserError
from entityseg.data.coco_entity import ENTITY_CATEGORY
from entityseg.data.errors import EntityDataError
from entityseg.data.rle import describe
from entityseg.evaluation.entity_ap import read_ground_truth
from entityseg.inference.fusion import Entities

log = logging.getLogger(__name__)

#: ``save_pictures`` -> how many of (id map, overlay) are written.
PICTURES = {"all": 2, "id_map": 1, "none": 0}


class InputError(UserError):
    """An input or output of a prediction run that cannot work (nothing to predict, two
    photos of one name, an output over an input, a results file of other settings)."""


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: whole or absent."""
    return path.with_name(f".{path.name}.partial")


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
    """The entity-id PNG and the overlay JPEG of an image, named so that neither can be taken
    for the photo (``photo.png`` gives ``photo_entities.png``); ``stem``: the photo's name
    without the suffix, with the subfolders it has under the input (``a/1`` for ``a/1.jpg``)."""
    return out_dir / f"{stem}_entities.png", out_dir / f"{stem}_overlay.jpg"


def image_json_path(out_dir: Path, stem: str) -> Path:
    """The per-image json of ``output_format=per_image`` (SA-1B's layout)."""
    return out_dir / f"{stem}.json"


def comparison_path(out_dir: Path, stem: str) -> Path:
    """Two modes' entities side by side (``inference.compare``)."""
    return out_dir / f"{stem}_compare.jpg"


def output_paths(
    out_dir: Path, stem: str, save_pictures: str, per_image: bool, compare: bool = False
) -> list[Path]:
    """Every file a prediction run writes for an image: the pictures ``save_pictures`` asks
    for (``all``: id map and overlay; ``id_map``; ``none``), its json when ``per_image`` and
    the side-by-side picture when ``compare``."""
    pictures = list(picture_paths(out_dir, stem))[: PICTURES[save_pictures]]
    pictures += [image_json_path(out_dir, stem)] if per_image else []
    return pictures + ([comparison_path(out_dir, stem)] if compare else [])


def write_comparison(picture: np.ndarray, out_dir: Path, stem: str) -> Path:
    """The side-by-side picture of :func:`comparison_path`, written whole or not at all."""
    path = comparison_path(out_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_then_rename(Image.fromarray(picture), path, "JPEG", quality=90)
    return path


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` under its partial name (:func:`partial_path`), on disk (fsynced) before
    it is renamed, so that it is either whole or absent, also after a power cut. ``write``
    writes the open binary file; the caller syncs the folder (once for several files)."""
    partial = partial_path(path)
    with open(partial, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _save_then_rename(picture: Image.Image, path: Path, image_format: str, **options) -> None:
    """A picture written whole or not at all (:func:`write_whole`)."""
    write_whole(path, lambda f: picture.save(f, format=image_format, **options))


def write_pictures(
    image: np.ndarray | None,
    entities: Entities,
    out_dir: Path,
    stem: str,
    save_pictures: str = "all",
) -> np.ndarray | None:
    """The entity-id PNG (``Entities.to_id_map``) and the overlay JPEG (``Entities.overlay``,
    crops drawn) of an image, as ``save_pictures`` asks (``all``, ``id_map``: the PNG only,
    ``none``); returns the overlay (None when not drawn). ``image``: the photo, needed for
    the overlay only."""
    png, overlay_jpg = picture_paths(out_dir, stem)
    if save_pictures == "none":
        return None
    png.parent.mkdir(parents=True, exist_ok=True)
    id_map = entities.to_id_map()
    _save_then_rename(Image.fromarray(id_map), png, "PNG")  # uint16 -> 16-bit PNG
    overlay = None
    if save_pictures == "all":
        overlay = entities.overlay(image, id_map=id_map)
        _save_then_rename(Image.fromarray(overlay), overlay_jpg, "JPEG", quality=90)
    fsync_folder(png.parent)
    return overlay


def coco_json(images: Iterable[tuple[str, Entities]]) -> dict:
    """A whole COCO json of the entities of many images, as training
    (:func:`~entityseg.data.coco_entity.load_entity_json`) and evaluation read one:
    ``images`` (ids from 1, ``file_name`` as given, height, width), ``annotations`` (one per
    entity: COCO RLE ``segmentation``, ``area``, ``bbox`` XYWH, ``iscrowd`` 0, the one
    class-agnostic category, and the entity's ``score``, which readers of ground truth
    ignore) and ``categories``. ``images``: (file name, its entities) pairs, e.g.
    ``[(p.name, segmenter(p)) for p in photos]``: pseudo-labels to train or score on.
    """
    data: dict = {"images": [], "annotations": [], "categories": [dict(ENTITY_CATEGORY)]}
    for image_id, (file_name, entities) in enumerate(images, start=1):
        height, width = entities.image_size
        data["images"].append(
            {"id": image_id, "file_name": str(file_name), "height": height, "width": width}
        )
        boxes = mask_utils.toBbox(entities.rles).tolist() if entities.rles else []
        for rle, area, box, score in zip(
            entities.rles,
            entities.areas.tolist(),
            boxes,
            entities.scores.tolist(),
            strict=True,
        ):
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": ENTITY_CATEGORY["id"],
                    "segmentation": rle,
                    "area": int(area),
                    "bbox": [float(v) for v in box],
                    "iscrowd": 0,
                    "score": float(score),
                }
            )
    return data


def write_image_json(
    entities: Entities, out_dir: Path, stem: str, image_id: int, file_name: str
) -> Path:
    """One image's entities as a json of its own, in SA-1B's layout (what users of
    segment-everything tools read): ``image`` {image_id, width, height, file_name} and
    ``annotations`` [{id, segmentation (COCO RLE), bbox (XYWH), area, score, crop_box}].
    Every entity is of the whole image (its views fused), so ``crop_box`` is the image's
    box."""
    height, width = entities.image_size
    boxes = mask_utils.toBbox(entities.rles).tolist() if entities.rles else []
    areas, scores = entities.areas.tolist(), entities.scores.tolist()
    record = {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": file_name},
        "annotations": [
            {
                "id": k + 1,
                "segmentation": rle,
                "bbox": [float(v) for v in boxes[k]],
                "area": int(areas[k]),
                "score": float(score),
                "crop_box": [0, 0, width, height],
            }
            for k, (rle, score) in enumerate(zip(entities.rles, scores, strict=True))
        ],
    }
    path = image_json_path(out_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda f: f.write(json.dumps(record).encode()))
    return path


def prediction_records(entities: Entities, image_id: int, file_name: str) -> list[dict]:
    """An image's records of ``predictions.json``: COCO results with its file name."""
    return [{**record, "file_name": file_name} for record in entities.to_coco(image_id)]
