"""Read COCO-format entity annotations (EntitySeg, COCO panoptic converted, our synthetic set).

Entity segmentation is class-agnostic: every non-crowd annotation is one entity, whatever its
``category_id``. Crowd annotations (``iscrowd=1``) are kept out of the training targets, as
pycocotools keeps them out of the matching (it only uses them as regions to ignore); their count
is recorded per image. Masks are decoded with pycocotools from compressed or uncompressed RLE or
from polygons. Images are read with their EXIF orientation applied, as EntitySeg's photos carry
it, and converted to 8-bit RGB.

Also converts COCO panoptic (PNG segment ids ``R + 256 G + 256^2 B``) to an entity json, the way
COCO is prepared for entity pre-training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageOps, UnidentifiedImageError

from entityseg.data.errors import EntityDataError
from entityseg.data.rle import check_rle

log = logging.getLogger(__name__)

ENTITY_CATEGORY = {"id": 1, "name": "entity", "supercategory": "entity"}

#: What an image can be given as: a file path, a PIL image, an RGB uint8 array [H, W, 3].
ImageInput = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class EntityImage:
    """One image of an entity json: where it is and its non-crowd entity annotations."""

    json_path: Path
    image_id: int
    path: Path
    height: int
    width: int
    annotations: tuple[dict, ...]
    num_crowd: int


def load_entity_json(json_path: str | Path, image_dir: str | Path) -> list[EntityImage]:
    """Index a COCO instance json: one :class:`EntityImage` per image, in the json's order.

    Raises :class:`EntityDataError` naming the file when it is not COCO instance json.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    try:
        with open(json_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise EntityDataError(json_path, "annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EntityDataError(json_path, f"not valid json ({err})") from None
    _check_coco_layout(data, json_path)

    by_image: dict[int, list[dict]] = {}
    image_ids = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids:
            raise EntityDataError(
                json_path, f"image_id {ann['image_id']} is not in 'images'", ann["id"]
            )
        by_image.setdefault(ann["image_id"], []).append(ann)

    images = []
    for img in data["images"]:
        anns = by_image.get(img["id"], [])
        entities = tuple(a for a in anns if not a.get("iscrowd", 0))
        images.append(
            EntityImage(
                json_path=json_path,
                image_id=int(img["id"]),
                path=image_dir / img["file_name"],
                height=int(img["height"]),
                width=int(img["width"]),
                annotations=entities,
                num_crowd=len(anns) - len(entities),
            )
        )
    return images


def _check_coco_layout(data: object, json_path: Path) -> None:
    if not isinstance(data, dict):
        raise EntityDataError(json_path, "not a COCO instance json: top level is not an object")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise EntityDataError(json_path, f"not a COCO instance json: no '{key}' list")
    for img in data["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise EntityDataError(json_path, f"image entry {img.get('id')} lacks {missing}")
    for ann in data["annotations"]:
        missing = [k for k in ("id", "image_id", "segmentation") if k not in ann]
        if missing:
            raise EntityDataError(json_path, f"annotation lacks {missing}", ann.get("id"))


#: The image formats entityseg reads, as Pillow names them. Files are handed to these plugins
#: only, whatever their name: never to the others Pillow has (a PostScript file named ``.jpg``
#: would otherwise go to Ghostscript). Camera JPEGs that Pillow calls MPO open as JPEG.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
#: The file suffixes of :data:`IMAGE_FORMATS`: what ``predict`` looks for in a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """The image file ``path``, opened lazily (header read, pixels not decoded yet) by the
    plugins of :data:`IMAGE_FORMATS` only.

    A missing, empty or non-image file, a format outside the list, or one whose header claims
    more pixels than Pillow decodes (a decompression bomb) raises :class:`EntityDataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise EntityDataError(path, "image file not found")
    if path.stat().st_size == 0:
        raise EntityDataError(path, "image file is empty (0 bytes)")
    try:
        img = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise EntityDataError(
            path, f"not an image file (entityseg reads {', '.join(IMAGE_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as err:
        raise EntityDataError(path, f"refused as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise EntityDataError(path, f"corrupt image ({err})") from None
    with img:
        yield img


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read an image as uint8 RGB ``[H, W, 3]`` with its EXIF orientation applied.

    Grayscale is replicated to three channels, alpha is dropped, 16-bit images keep their high
    byte. Missing, empty, truncated or non-image files, formats outside :data:`IMAGE_FORMATS`
    and decompression bombs raise :class:`EntityDataError` (:func:`open_image`).
    """
    with open_image(path) as img:
        try:
            img.load()
            return pil_to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise EntityDataError(path, f"corrupt image ({err})") from None


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 RGB ``[H, W, 3]``, EXIF orientation applied, as
    :func:`read_rgb_image` reads a file (palette, alpha, greyscale, 16-bit)."""
    return _to_rgb8(ImageOps.exif_transpose(img))


def rgb_image(image: ImageInput) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a file path (:func:`read_rgb_image`), a PIL image
    (:func:`pil_to_rgb`) or an array that already is one (returned as it is).

    An unreadable file raises :class:`EntityDataError` naming it; an array of another shape or
    dtype ``ValueError``; anything else ``TypeError``.
    """
    if isinstance(image, str | Path):
        return read_rgb_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.size:
            raise ValueError(
                f"an image array must be RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        return image
    raise TypeError(
        f"an image must be a path, a PIL image or an RGB uint8 [H, W, 3] array, not a "
        f"{type(image).__name__}"
    )


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img).astype(np.int64)
        shift = 8 if array.max(initial=0) > 255 else 0
        gray = np.clip(array >> shift, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_entity_image(record: EntityImage) -> np.ndarray:
    """Read a record's image and check its size against the json's ``height`` x ``width``."""
    image = read_rgb_image(record.path)
    if image.shape[:2] != (record.height, record.width):
        h, w = image.shape[:2]
        raise EntityDataError(
            record.path,
            f"image is {w}x{h} (after EXIF orientation) but its json entry {record.image_id} "
            f"says {record.width}x{record.height}",
        )
    return image


def decode_entity_mask(
    ann: dict,
    height: int,
    width: int,
    source: str | Path,
    strict: bool = True,
    stats: Counter | None = None,
) -> np.ndarray:
    """Decode one annotation's segmentation to a uint8 ``[height, width]`` mask with pycocotools.

    Raises :class:`EntityDataError` (naming ``source`` and the annotation id) for an empty or
    degenerate polygon, an RLE that :func:`~entityseg.data.rle.check_rle` refuses (a size that
    is not the image's, counts that do not sum to its pixels), or an unknown format. A
    self-intersecting polygon is an error in ``strict`` mode; otherwise it is rasterised as
    pycocotools does (so training sees what evaluation scores), logged and counted in ``stats``.
    """
    segm = ann.get("segmentation")
    ann_id = ann.get("id")
    if isinstance(segm, dict):
        return _decode_rle(segm, height, width, source, ann_id)
    if isinstance(segm, list):
        return _decode_polygons(segm, height, width, source, ann_id, strict, stats)
    raise EntityDataError(source, f"segmentation of type {type(segm).__name__}", ann_id)


def _decode_rle(segm: dict, height: int, width: int, source, ann_id) -> np.ndarray:
    try:  # pycocotools decodes broken counts into garbage, or for minutes: check them first
        check_rle(segm, height, width)
    except ValueError as err:
        raise EntityDataError(source, str(err), ann_id) from None
    counts = segm["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = {"size": [height, width], "counts": counts}
    try:
        return mask_utils.decode(rle)
    except Exception as err:  # pycocotools raises bare exceptions on broken counts
        raise EntityDataError(source, f"RLE cannot be decoded ({err})", ann_id) from None


def _decode_polygons(
    polygons: list, height: int, width: int, source, ann_id, strict: bool, stats: Counter | None
) -> np.ndarray:
    if not polygons or any(not isinstance(p, list) or len(p) < 6 for p in polygons):
        raise EntityDataError(source, "empty polygon (fewer than 3 points)", ann_id)
    if any(len(p) % 2 for p in polygons):
        raise EntityDataError(source, "polygon with an odd number of coordinates", ann_id)
    if any(_self_intersects(np.asarray(p, dtype=np.float64).reshape(-1, 2)) for p in polygons):
        if strict:
            raise EntityDataError(source, "self-intersecting polygon", ann_id)
        log.warning(
            "%s: annotation %s: self-intersecting polygon, rasterised as is", source, ann_id
        )
        if stats is not None:
            stats["self_intersecting_polygon"] += 1
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    mask = mask_utils.decode(rle)
    if not mask.any():
        raise EntityDataError(source, "polygon covers no pixel", ann_id)
    return mask


def _self_intersects(points: np.ndarray) -> bool:
    """True if two non-adjacent edges of the closed polygon cross (proper intersection)."""
    n = len(points)
    if n < 4:
        return False
    a, b = points, np.roll(points, -1, axis=0)  # edge i goes a[i] -> b[i]
    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # the first and last edges share a vertex
    i, j = i[keep], j[keep]

    def orient(p, q, r):
        return np.sign(
            (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
            - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        )

    d1, d2 = orient(a[i], b[i], a[j]), orient(a[i], b[i], b[j])
    d3, d4 = orient(a[j], b[j], a[i]), orient(a[j], b[j], b[i])
    return bool(np.any((d1 * d2 < 0) & (d3 * d4 < 0)))


def iter_entity_masks(
    record: EntityImage, strict: bool = True, stats: Counter | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(annotation id, mask [H, W] uint8)`` for each entity of an image.

    In non-strict mode an annotation that cannot be decoded is logged, counted in
    ``stats["skipped_annotation"]`` and left out; in strict mode it raises. Errors name the
    json, the image and the annotation id.
    """
    source = f"{record.json_path} (image {record.path.name})"
    for ann in record.annotations:
        try:
            mask = decode_entity_mask(ann, record.height, record.width, source, strict, stats)
        except EntityDataError as err:
            if strict:
                raise
            log.warning("skipped: %s", err)
            if stats is not None:
                stats["skipped_annotation"] += 1
            continue
        yield int(ann["id"]), mask


def panoptic_to_entity_json(
    panoptic_json: str | Path,
    panoptic_dir: str | Path,
    out_json: str | Path,
    show_progress: bool = False,
) -> Path:
    """Convert COCO panoptic annotations to a class-agnostic entity json (RLE, category 1).

    Every thing and stuff segment is an entity; crowd segments keep ``iscrowd=1``. Annotation
    ids are the panoptic segment ids made unique across images by renumbering from 1.

    The json is written as it is made, one image's annotations at a time (COCO panoptic
    train2017 has 118k images: no mask or RLE of another image is held), under a temporary
    name renamed to ``out_json`` at the end. Its text is that of ``json.dump`` of
    ``{"images", "annotations", "categories"}``. ``show_progress``: a progress bar on stderr.
    """
    panoptic_json, panoptic_dir = Path(panoptic_json), Path(panoptic_dir)
    with open(panoptic_json) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise EntityDataError(panoptic_json, "not a COCO panoptic json: no 'images'/'annotations'")
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    images = [{k: img[k] for k in ("id", "file_name", "height", "width")} for img in data["images"]]
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    partial = out_json.with_name(f".{out_json.name}.partial")
    num_annotations = 0
    try:
        with open(partial, "w") as f:
            f.write('{"images": ' + json.dumps(images) + ', "annotations": [')
            for pan in _progress(data["annotations"], show_progress):
                if pan["image_id"] not in sizes:
                    raise EntityDataError(
                        panoptic_json, f"annotation of image_id {pan['image_id']}: not in 'images'"
                    )
                for ann in _panoptic_entities(
                    pan, panoptic_dir, sizes[pan["image_id"]], num_annotations + 1
                ):
                    f.write((", " if num_annotations else "") + json.dumps(ann))
                    num_annotations += 1
            f.write('], "categories": ' + json.dumps([ENTITY_CATEGORY]) + "}")
        os.replace(partial, out_json)
    finally:
        partial.unlink(missing_ok=True)
    return out_json


def _panoptic_entities(
    pan: dict, panoptic_dir: Path, size: tuple[int, int], first_id: int
) -> list[dict]:
    """The entity annotations of one panoptic image, ids from ``first_id``."""
    png = panoptic_dir / pan["file_name"]
    ids = _read_panoptic_ids(png)
    if ids.shape != size:
        raise EntityDataError(png, f"PNG is {ids.shape} but the image is {size}")
    annotations = []
    for seg in pan["segments_info"]:
        mask = ids == seg["id"]
        if not mask.any():
            raise EntityDataError(png, f"segment {seg['id']} has no pixel")
        annotations.append(
            mask_to_annotation(
                first_id + len(annotations), pan["image_id"], mask, seg.get("iscrowd", 0)
            )
        )
    return annotations


def _progress(items: list, show_progress: bool) -> Iterable:
    """``items`` in a rich progress bar on stderr (stdout keeps the result), if asked."""
    if not show_progress:
        return items
    from rich.console import Console  # imported lazily: only the command line draws a bar
    from rich.progress import track

    return track(items, description="panoptic -> entities", console=Console(stderr=True))


def _read_panoptic_ids(png: Path) -> np.ndarray:
    try:
        rgb = np.asarray(Image.open(png, formats=["PNG"]).convert("RGB"), dtype=np.int64)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise EntityDataError(png, f"cannot read panoptic PNG ({err})") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_to_annotation(ann_id: int, image_id: int, mask: np.ndarray, iscrowd: int = 0) -> dict:
    """A COCO annotation (compressed RLE, category 1) for a binary ``[H, W]`` mask."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": ENTITY_CATEGORY["id"],
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(iscrowd),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m entityseg.data.coco_entity PANOPTIC_JSON PANOPTIC_PNG_DIR OUT_JSON``."""
    parser = argparse.ArgumentParser(description="COCO panoptic -> class-agnostic entity json")
    parser.add_argument("panoptic_json")
    parser.add_argument("panoptic_dir")
    parser.add_argument("out_json")
    args = parser.parse_args(argv)
    print(
        panoptic_to_entity_json(
            args.panoptic_json, args.panoptic_dir, args.out_json, show_progress=True
        )
    )


if __name__ == "__main__":
    main()
