"""Entity masks for your own images.

``python -m entityseg.predict ckpt_path=... input=<image | folder | glob> output=<folder>
[inference.mode=batch_oc] [data.test_crop_layout=fixed8]`` writes, per image, ``<stem>.png``
(16-bit entity-id map, 0 = none, 1 = the highest-scoring entity) and ``<stem>_overlay.jpg``
(coloured entities with outlines and the crop boxes), and one ``predictions.json`` (COCO
results with ``file_name``, RLE and score; with ``gt=<coco json>`` the image ids follow that
json). Unreadable images are reported by name and skipped; the exit code is 1 if any failed.
``inference.precision=bf16`` and ``model.compile=true`` as in ``entityseg.evaluate``.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track

from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.datamodule import test_view_config
from entityseg.data.errors import EntityDataError
from entityseg.data.views import collate_views, prediction_views
from entityseg.evaluate import check_modes, load_network
from entityseg.inference.cuda_graphs import check_cuda_graphs, graphed
from entityseg.inference.fusion import Entities, to_coco_results
from entityseg.inference.runner import check_precision, resolve_view_chunk, run_modes
from entityseg.viz import draw_boxes, id_map_from_rles, overlay_id_map

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(pattern: str) -> list[Path]:
    """An image file, every image of a folder (sorted), or the files matching a glob."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not matches:
        raise SystemExit(f"input={pattern!r}: no such file, folder or matching files")
    return matches


def image_ids_from_gt(gt_json: str | None) -> dict[str, int]:
    """File name -> image id of a COCO json (empty without one)."""
    if gt_json is None:
        return {}
    images = json.loads(Path(gt_json).read_text())["images"]
    return {Path(img["file_name"]).name: int(img["id"]) for img in images}


def write_pictures(image: np.ndarray, entities: Entities, boxes, out_dir: Path, stem: str) -> None:
    id_map = id_map_from_rles(entities.rles, *image.shape[:2])
    Image.fromarray(id_map).save(out_dir / f"{stem}.png")  # uint16 -> 16-bit PNG
    overlay = draw_boxes(overlay_id_map(image, id_map), boxes[1:])
    Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.jpg", quality=90)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    check_modes([cfg.inference.mode])
    check_precision(cfg.inference.precision)
    check_cuda_graphs(cfg.inference.cuda_graphs)
    resolve_view_chunk(cfg.inference.view_chunk, "cpu")  # checked now, resolved per device
    net, data, device = load_network(cfg)
    views = test_view_config(**data)
    mode = cfg.inference.mode
    if mode != "image_o" and not net.has_batch_decoder:
        log.info(
            "inference.mode=%s needs CropFormer's batch decoder; this Mask2Former network "
            "predicts with image_o",
            mode,
        )
        mode = "image_o"
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    known_ids = image_ids_from_gt(cfg.gt)
    forward = graphed(net, cfg.inference.cuda_graphs, device)  # one graph cache for all images

    paths = find_images(cfg.input)
    predictions, failed = [], []
    for index, path in enumerate(track(paths, description="predicting")):
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
        image_id = known_ids.get(path.name, index + 1)
        sample = prediction_views(image, views)
        sample.update(image_id=image_id, file_name=str(path), num_skipped=0)
        batch = collate_views([sample])
        result = run_modes(
            forward,
            [batch],
            [mode],
            device,
            cfg.inference.max_entities,
            cfg.inference.overlapping,
            cfg.inference.query_chunk,
            description="",
            show_progress=False,
            precision=cfg.inference.precision,
            compat=cfg.inference.compat,
            view_chunk=cfg.inference.view_chunk,
        )[mode]
        entities = result.entities[image_id]
        write_pictures(image, entities, sample["crop_boxes"].tolist(), out_dir, path.stem)
        for record in to_coco_results(entities, image_id):
            predictions.append({**record, "file_name": path.name})
    (out_dir / "predictions.json").write_text(json.dumps(predictions))
    log.info(
        "wrote %d entities of %d images to %s",
        len(predictions),
        len(paths) - len(failed),
        out_dir,
    )
    if failed:
        raise SystemExit(
            f"{len(failed)} image(s) could not be read: " + ", ".join(str(p) for p in failed)
        )


if __name__ == "__main__":
    main()
