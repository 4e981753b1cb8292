"""How much the training crop view changes with its sizing: ``same`` (ours) vs ``own`` (release).

``data.train_crop_resize=same`` resizes the crop I^C to the full view's size; ``own`` resizes it
by its own shortest edge with the same short side and cap, as the release's ``entity_crop``
mapper does. On the two shared COCO photos, with the draws the release recorded in
``official_reference/cropformer_tiny/training.pt`` (short side 160, max 256, its flips and
crops), this prints per photo the two crop-view sizes, the share of labelled mask pixels that
differ (on the common top-left area) and the per-entity mask IoU (the ``own`` masks resized to
the ``same`` size with nearest neighbours).

    python scripts/compare_crop_resize.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from entityseg.data.coco_entity import (
    iter_entity_masks,
    load_entity_json,
    panoptic_to_entity_json,
    read_entity_image,
)
from entityseg.data.views import render_crop_views

SHORT, MAX_SIZE = 160, 256  # the reference run's MIN_SIZE_TRAIN / MAX_SIZE_TRAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=default)
    args = parser.parse_args()
    sample = args.shared / "coco_panoptic_sample"
    reference = torch.load(
        args.shared / "official_reference/cropformer_tiny/training.pt", weights_only=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        gt = panoptic_to_entity_json(
            sample / "panoptic.json", sample / "panoptic", Path(tmp) / "entity.json"
        )
        records = load_entity_json(gt, sample / "images")
        print("| photo | crop view same | own | mask pixels differing | entity IoU min / mean |")
        print("|---|---|---|---|---|")
        for index, record in enumerate(records):
            image = read_entity_image(record)
            entities = list(iter_entity_masks(record))
            draws = dict(
                short=SHORT,
                max_size=MAX_SIZE,
                flipped=bool(reference["flipped"][index]),
                crop_box=tuple(reference[f"{index}.crop_region"][0].tolist()),
            )
            same = render_crop_views(image, entities, crop_resize="same", **draws)
            own = render_crop_views(image, entities, crop_resize="own", **draws)
            same_masks, own_masks = same.masks[1].astype(bool), own.masks[1].astype(bool)
            h = min(same_masks.shape[1], own_masks.shape[1])
            w = min(same_masks.shape[2], own_masks.shape[2])
            labelled = same_masks[:, :h, :w] | own_masks[:, :h, :w]
            differ = same_masks[:, :h, :w] != own_masks[:, :h, :w]
            size = same_masks.shape[2], same_masks.shape[1]
            ious = []
            for a, b in zip(same_masks, own_masks, strict=True):
                b = np.asarray(Image.fromarray(b).resize(size, Image.Resampling.NEAREST))
                union = (a | b).sum()
                if union:
                    ious.append((a & b).sum() / union)
            print(
                f"| {record.path.name} | {same_masks.shape[1]} x {same_masks.shape[2]} "
                f"| {own_masks.shape[1]} x {own_masks.shape[2]} "
                f"| {differ.sum() / max(1, labelled.sum()):.1%} "
                f"| {min(ious):.2f} / {np.mean(ious):.2f} |"
            )


if __name__ == "__main__":
    main()
