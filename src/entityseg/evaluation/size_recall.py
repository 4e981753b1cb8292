"""Which ground-truth entities a mode recovers, by entity size: what the crops bring back.

An entity is recovered when some predicted mask overlaps it with IoU >= ``iou`` (pycocotools'
mask IoU, crowd annotations left out). Binning by ground-truth area shows where CropFormer's
crops help: the small entities that vanish at network resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

#: Area bins in pixels of the original image: [0, 32^2), [32^2, 96^2), ... as COCO, plus tiny.
AREA_BINS = (0, 8**2, 16**2, 32**2, 96**2, float("inf"))


def recall_by_area(
    gt: COCO,
    predictions: Mapping[int, Sequence[dict]],
    bins: Sequence[float] = AREA_BINS,
    iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Recovered fraction per area bin and the number of entities per bin.

    ``predictions`` maps an image id to its predicted RLEs (``segmentation`` dicts or RLEs).
    """
    edges = np.asarray(bins, dtype=float)
    found = np.zeros(len(edges) - 1)
    total = np.zeros(len(edges) - 1)
    for image_id in gt.getImgIds():
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        gt_rles = [gt.annToRLE(a) for a in anns]
        areas = mask_utils.area(gt_rles).astype(float)
        dt_rles = [p.get("segmentation", p) for p in predictions.get(image_id, [])]
        if dt_rles:
            overlaps = mask_utils.iou(dt_rles, gt_rles, [0] * len(gt_rles))  # [D, G]
            hit = np.asarray(overlaps).max(axis=0) >= iou
        else:
            hit = np.zeros(len(gt_rles), dtype=bool)
        index = np.digitize(areas, edges[1:-1])
        np.add.at(total, index, 1)
        np.add.at(found, index, hit)
    with np.errstate(invalid="ignore", divide="ignore"):
        return found / total, total
