"""Two modes' entities of one image side by side: which are the same, and what changed.

Image-O against Batch-OC is the paper's question (Table 7): what do the crops add? For one
image, :func:`compare_entities` matches the two sets of entities one to one by mask IoU
(Hungarian, ``scipy.optimize.linear_sum_assignment``, pairs of IoU >= ``min_iou``), so that a
picture can colour matched entities alike (:func:`matched_colors`), and counts three kinds of
difference by pixels, each defined so that one entity is not two things at once:

* **recovered**: an entity of ``found`` (Batch-OC) most of whose pixels (over half) belong to
  no entity of ``baseline`` (Image-O): something the baseline did not segment at all;
* **merged**: an entity of ``found`` that holds most of the pixels (over half) of two or more
  ``baseline`` entities: it joins what the baseline kept apart;
* **split**: an entity of ``baseline`` that holds most of the pixels of two or more ``found``
  entities: ``found`` cut it into parts.

An entity that merges two baseline entities is therefore not "recovered", however few
entities of the baseline match it one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from entityseg.inference.fusion import Entities

#: Matched entities: one to one, at this mask IoU or more.
MATCH_IOU = 0.5
#: "Most of its pixels": the share of an entity's area that decides recovered, merged, split.
MOST = 0.5


@dataclass(frozen=True)
class ModeComparison:
    """What :func:`compare_entities` finds: entity indices of ``found`` and ``baseline``."""

    matches: list[tuple[int, int]]  # (found, baseline), one to one
    recovered: list[int]  # found entities mostly outside every baseline entity
    merged: list[int]  # found entities holding most of two or more baseline entities
    split: list[int]  # baseline entities holding most of two or more found entities

    def counts(self) -> dict[str, int]:
        """The number of each kind, as json values."""
        return {
            "matched": len(self.matches),
            "recovered": len(self.recovered),
            "merged": len(self.merged),
            "split": len(self.split),
        }


def shared_pixels(iou: np.ndarray, areas_a: np.ndarray, areas_b: np.ndarray) -> np.ndarray:
    """float64 [K, K']: the pixels two sets of masks share, from pycocotools' IoU and their
    areas: |A & B| = IoU (|A| + |B|) / (1 + IoU)."""
    a, b = areas_a.astype(np.float64)[:, None], areas_b.astype(np.float64)[None, :]
    return np.rint(iou * (a + b) / (1 + iou))


def _iou(rles_a: list[dict], rles_b: list[dict]) -> np.ndarray:
    """Mask IoU [K, K'] by pycocotools (no crowd)."""
    if not rles_a or not rles_b:
        return np.zeros((len(rles_a), len(rles_b)))
    return np.asarray(mask_utils.iou(rles_a, rles_b, [0] * len(rles_b)))


def compare_entities(
    found: Entities, baseline: Entities, min_iou: float = MATCH_IOU
) -> ModeComparison:
    """Match ``found``'s entities to ``baseline``'s and name the differences (see the module
    docstring); e.g. ``compare_entities(batch_oc, image_o)``."""
    if found.image_size != baseline.image_size:
        raise ValueError(f"entities of {found.image_size} and {baseline.image_size} images")
    iou = _iou(found.rles, baseline.rles)  # [K, K']
    rows, cols = linear_sum_assignment(-iou)
    matches = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]
    found_areas = found.areas.numpy()
    baseline_areas = baseline.areas.numpy()
    shared = shared_pixels(iou, found_areas, baseline_areas)
    covered = np.zeros(len(found))  # pixels of each found entity inside any baseline entity
    if baseline.rles:
        union = mask_utils.merge(baseline.rles, intersect=False)
        covered = shared_pixels(
            _iou(found.rles, [union]), found_areas, mask_utils.area([union])
        ).ravel()
    recovered = np.flatnonzero(covered < MOST * found_areas).tolist()
    holds_baseline = shared > MOST * baseline_areas[None, :]  # found k holds most of baseline j
    merged = np.flatnonzero(holds_baseline.sum(axis=1) >= 2).tolist()
    holds_found = shared > MOST * found_areas[:, None]  # baseline j holds most of found k
    split = np.flatnonzero(holds_found.sum(axis=0) >= 2).tolist()
    return ModeComparison(matches, recovered, merged, split)


def matched_colors(comparison: ModeComparison, found: int, baseline: int) -> np.ndarray:
    """Colour indices of ``found``'s entities (long [found]) such that a matched entity takes
    the colour of its ``baseline`` partner (baseline entity j has colour j) and the others
    colours no baseline entity has."""
    colors = np.full(found, -1, dtype=np.int64)
    for k, j in comparison.matches:
        colors[k] = j
    unmatched = np.flatnonzero(colors < 0)
    colors[unmatched] = baseline + np.arange(len(unmatched))
    return colors
