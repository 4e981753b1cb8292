"""AP^e: class-agnostic COCO mask AP of entity predictions, computed by pycocotools.

Entity segmentation has one class, "entity", so every ground-truth annotation and every
prediction is put in category 1 before pycocotools' ``COCOeval(iouType="segm")`` runs with its
standard parameters (IoU .50:.05:.95, maxDets 1/10/100, COCO area ranges). Predictions' ``bbox``
is dropped, so that ``loadRes`` takes each prediction's area from its mask (with a ``bbox`` it
would take the box's area, and the small/medium/large split would follow the boxes). Crowd
ground truth (``iscrowd=1``) stays an ignore region, as pycocotools treats it. The numbers are
exactly those of a plain pycocotools run done that way, times 100:

* a metric that pycocotools reports as -1 (no non-crowd ground truth in that area range) is
  ``float("nan")``, not -100, so it cannot be averaged into a table by mistake;
* an empty prediction list (which ``loadRes`` cannot load) is evaluated as an empty result set:
  0.0 wherever there is ground truth, NaN where pycocotools would say -1, as for any other
  prediction list;
* every ground-truth image is evaluated, so an image without predictions counts its entities
  as misses; predictions for images that are not in the ground truth are an error.

Both inputs are checked before pycocotools sees them (it would end in a ``TypeError`` or
``KeyError``, or decode broken RLE into garbage or for minutes): see
:func:`check_ground_truth` and :func:`class_agnostic_results`. A problem raises
:class:`~entityseg.data.errors.EntityDataError` (a ``ValueError``), one line naming the file
(or ``predictions`` for a list given in memory), the annotation or prediction, and what is
wrong, e.g. ``gt.json: annotation 7: RLE counts sum to 1000, not 12 x 100 = 1200``.

``EntityAP`` wraps the same evaluation as a torchmetrics ``Metric`` whose state can be gathered
across DDP ranks. Command line::

    python -m entityseg.evaluation.entity_ap GT_JSON PREDICTIONS_JSON [--verbose]

prints the metrics as one line of JSON (NaN written as ``null``, as :func:`metrics_json` writes
every metrics file); an unusable input prints one line naming the file on stderr and exits
with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import numbers
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from entityseg.data.coco_entity import ENTITY_CATEGORY
from entityseg.data.errors import EntityDataError
from entityseg.data.rle import check_rle, describe, is_int

#: The first six numbers of ``COCOeval.summarize()`` (all at maxDets 100), in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: How many offending image ids an error message lists before it abbreviates.
_MAX_IDS_IN_MESSAGE = 20

#: Where in-memory predictions come from, for error messages.
_IN_MEMORY = "predictions"


def evaluate(
    gt_json_path: str | Path,
    predictions: list[dict] | str | Path,
    *,
    verbose: bool = False,
) -> dict[str, float]:
    """AP^e (in percent) of COCO-result ``predictions`` against the entity json ``gt_json_path``.

    ``predictions`` is a list of ``{"image_id", "segmentation": RLE, "score"}`` dicts (counts
    ``str`` or ``bytes``; ``category_id`` and ``bbox`` are ignored) or the path of a results
    json holding such a list. The inputs are not modified. ``verbose`` lets pycocotools print
    its progress and summary table. Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``,
    NaN where pycocotools reports -1.
    """
    gt_source = str(gt_json_path)
    with _pycocotools_output(verbose):
        coco_gt = class_agnostic_ground_truth(_read_json(gt_json_path), gt_source)
    source, raw_predictions = _predictions_and_source(predictions)
    results = class_agnostic_results(raw_predictions, source)
    _check_images(results, coco_gt, gt_source, source)
    with _pycocotools_output(verbose):
        coco_dt = _load_results(coco_gt, results)
        stats = _run_cocoeval(coco_gt, coco_dt)
    return _metrics_from_stats(stats)


def read_ground_truth(gt_json_path: str | Path) -> dict:
    """The entity json ``gt_json_path``, checked by :func:`check_ground_truth`.

    Raises :class:`EntityDataError` naming the file when it is missing, unreadable, not json,
    or not ground truth that pycocotools can score.
    """
    data = _read_json(gt_json_path)
    check_ground_truth(data, str(gt_json_path))
    return data


def check_ground_truth(data: Any, source: str) -> None:
    """Raise :class:`EntityDataError` (one line naming ``source``) unless ``data`` is COCO
    instance json that pycocotools scores as it is.

    * ``images``: a list of objects with a unique integer ``id`` and positive integer
      ``height`` and ``width``;
    * ``annotations`` (may be absent: no entity): objects with a unique positive integer ``id``
      (pycocotools looks annotations up by id and takes id 0 for "unmatched", so a duplicate id
      loses an annotation and id 0 lets one entity be matched many times), an ``image_id`` of
      ``images``, a ``segmentation`` that is an RLE of the image's size that
      :func:`~entityseg.data.rle.check_rle` accepts or a list of polygons of at least three
      points, an ``area`` (a finite number >= 0) and, if given, ``iscrowd`` 0 or 1.

    ``area`` is required, not computed: pycocotools puts ground truth in the small, medium and
    large ranges by it, and COCO's and EntitySeg's json always hold it (for polygons, the
    annotation tool's polygon area, which a mask would not give back exactly).
    """
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise EntityDataError(source, "not a COCO json: expected an object with an 'images' list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise EntityDataError(source, "'annotations' is not a list")
    sizes = _image_sizes(data["images"], source)
    _check_annotation_ids(annotations, source)
    for ann in annotations:
        problem = _annotation_problem(ann, sizes)
        if problem is not None:
            raise EntityDataError(source, problem, ann["id"])


def _image_sizes(images: list, source: str) -> dict[int, tuple[int, int]]:
    """Image id -> (height, width) of the ground truth's checked ``images``."""
    sizes: dict[int, tuple[int, int]] = {}
    for index, image in enumerate(images):
        if not isinstance(image, Mapping):
            raise EntityDataError(source, f"image entry {index} is not an object")
        missing = [key for key in ("id", "height", "width") if key not in image]
        if missing:
            raise EntityDataError(source, f"image entry {index} lacks {missing}")
        image_id = image["id"]
        if not is_int(image_id):
            raise EntityDataError(
                source, f"image entry {index}: 'id' must be an integer, not {describe(image_id)}"
            )
        for key in ("height", "width"):
            if not is_int(image[key]) or image[key] <= 0:
                raise EntityDataError(
                    source,
                    f"image {image_id}: '{key}' must be a positive integer, not "
                    f"{describe(image[key])}",
                )
        if image_id in sizes:
            raise EntityDataError(source, f"image id {image_id} is not unique")
        sizes[image_id] = (image["height"], image["width"])
    return sizes


def _annotation_problem(ann: dict, sizes: Mapping[int, tuple[int, int]]) -> str | None:
    """What makes one ground-truth annotation unusable for pycocotools, or None."""
    missing = [key for key in ("image_id", "segmentation", "area") if key not in ann]
    if missing:
        return f"lacks {missing}"
    image_id = ann["image_id"]
    if not is_int(image_id) or image_id not in sizes:
        return f"image_id {describe(image_id)} is not in 'images'"
    if not _is_finite_number(ann["area"]) or ann["area"] < 0:
        return f"'area' must be a finite number >= 0, not {describe(ann['area'])}"
    iscrowd = ann.get("iscrowd", 0)
    if not isinstance(iscrowd, int) or iscrowd not in (0, 1):
        return f"'iscrowd' must be 0 or 1, not {describe(iscrowd)}"
    segmentation = ann["segmentation"]
    if isinstance(segmentation, Mapping):
        try:
            check_rle(segmentation, *sizes[image_id])
        except ValueError as err:
            return str(err)
        return None
    if isinstance(segmentation, list):
        return _polygons_problem(segmentation)
    return f"'segmentation' must be an RLE or a list of polygons, not {describe(segmentation)}"


def _polygons_problem(polygons: list) -> str | None:
    """What pycocotools would mis-read in a list of polygons (a 4-number one as a box), or
    None; the wording is that of the training data reader."""
    if not polygons or any(not isinstance(p, list) or len(p) < 6 for p in polygons):
        return "empty polygon (fewer than 3 points)"
    if any(len(p) % 2 for p in polygons):
        return "polygon with an odd number of coordinates"
    if not all(_is_finite_number(v) for p in polygons for v in p):
        return "polygon coordinates must be finite numbers"
    return None


def _is_finite_number(value: Any) -> bool:
    """A real number, not a bool, neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def class_agnostic_ground_truth(data: Any, source: str) -> COCO:
    """A pycocotools ``COCO`` of the json ``data`` with every annotation in the entity category.

    ``data`` is checked first (:func:`check_ground_truth`). The annotations are copied, so
    ``data`` is left as it is.
    """
    check_ground_truth(data, source)
    annotations = data.get("annotations", [])
    coco = COCO()
    coco.dataset = {
        **data,
        "annotations": [{**ann, "category_id": ENTITY_CATEGORY["id"]} for ann in annotations],
        "categories": [dict(ENTITY_CATEGORY)],
    }
    coco.createIndex()
    return coco


def class_agnostic_results(predictions: Any, source: str = _IN_MEMORY) -> list[dict]:
    """Validated copies of COCO results as ``loadRes`` should see them: category 1, no bbox.

    Only ``image_id`` (an integer, not a bool), ``segmentation`` (a compressed RLE) and
    ``score`` (a finite number: a NaN or infinite score is refused, not ranked) are kept, in
    their order, so ``loadRes`` computes each area and box from the mask. The RLE's counts are
    checked against its image in :func:`evaluate`, which knows the image sizes.
    """
    if not isinstance(predictions, list):
        raise EntityDataError(source, "predictions must be a list of COCO result objects")
    return [_class_agnostic_result(pred, index, source) for index, pred in enumerate(predictions)]


def _class_agnostic_result(prediction: Any, index: int, source: str) -> dict:
    """One prediction reduced to the fields AP^e uses, after checking they are usable."""
    where = f"prediction {index}"
    if not isinstance(prediction, Mapping):
        raise EntityDataError(source, f"{where} is not an object")
    missing = [key for key in ("image_id", "segmentation", "score") if key not in prediction]
    if missing:
        raise EntityDataError(source, f"{where} lacks {missing}")
    image_id, score = prediction["image_id"], prediction["score"]
    if not is_int(image_id):
        raise EntityDataError(
            source, f"{where}: 'image_id' must be an integer, not {describe(image_id)}"
        )
    where = _prediction(index, image_id)
    if not _is_finite_number(score):
        raise EntityDataError(
            source, f"{where}: 'score' must be a finite number, not {describe(score)}"
        )
    segmentation = prediction["segmentation"]
    if not _is_compressed_rle(segmentation):
        raise EntityDataError(
            source, f"{where}: 'segmentation' must be a compressed RLE {{'size', 'counts': str}}"
        )
    return {
        "image_id": int(image_id),
        "category_id": ENTITY_CATEGORY["id"],
        "segmentation": segmentation,
        "score": float(score),
    }


def _prediction(index: int, image_id: int) -> str:
    """How error messages name a prediction."""
    return f"prediction {index} (image {image_id})"


def _is_compressed_rle(segmentation: Any) -> bool:
    """Whether ``segmentation`` is an RLE that pycocotools can take the area of directly."""
    return (
        isinstance(segmentation, Mapping)
        and isinstance(segmentation.get("counts"), str | bytes)
        and isinstance(segmentation.get("size"), Sequence)
        and len(segmentation["size"]) == 2
    )


def _check_annotation_ids(annotations: list, source: str) -> None:
    """Reject annotation ids that pycocotools' index and matching silently mishandle."""
    seen: set = set()
    for ann in annotations:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not is_int(ann_id) or ann_id <= 0:
            raise EntityDataError(source, f"annotation id {ann_id!r} is not a positive integer")
        if ann_id in seen:
            raise EntityDataError(source, "annotation id is not unique", ann_id)
        seen.add(ann_id)


def _check_images(results: list[dict], coco_gt: COCO, gt_source: str, source: str) -> None:
    """Predictions must be for ground-truth images, with an RLE of the image's size whose
    counts :func:`~entityseg.data.rle.check_rle` accepts (pycocotools asserts on the first,
    silently mis-scores the second and decodes broken counts into garbage, or for minutes)."""
    images = coco_gt.imgs
    unknown = _sorted_ids({pred["image_id"] for pred in results} - images.keys())
    if unknown:
        raise EntityDataError(
            source, f"image ids not in the ground truth {gt_source}: {_format_ids(unknown)}"
        )
    for index, pred in enumerate(results):
        image = images[pred["image_id"]]
        expected = [image["height"], image["width"]]
        size = list(pred["segmentation"]["size"])
        where = _prediction(index, pred["image_id"])
        if size != expected:
            raise EntityDataError(
                source, f"{where}: mask size {_format_ids(size)} is not the image's {expected}"
            )
        try:
            check_rle(pred["segmentation"], *expected)
        except ValueError as err:
            raise EntityDataError(source, f"{where}: {err}") from None


def _sorted_ids(ids: set) -> list:
    """The ids in order (by their text when they are of mixed types)."""
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=str)


def _format_ids(ids: list) -> str:
    """The ids as a short list, abbreviated when there are many."""
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return f"[{shown}]" if more <= 0 else f"[{shown}, ... and {more} more]"


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """``coco_gt.loadRes(results)``, and for no results the empty result set it cannot build."""
    if results:
        return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": [dict(ENTITY_CATEGORY)],
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _run_cocoeval(coco_gt: COCO, coco_dt: COCO) -> list[float]:
    """pycocotools' standard mask evaluation over every ground-truth image."""
    evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
    evaluator.params.imgIds = sorted(coco_gt.getImgIds())
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [evaluator.stats[i] for i in range(len(METRIC_NAMES))]


def metrics_json(metrics: Any, **options: Any) -> str:
    """``json.dumps(metrics, **options)`` of a metrics dict or a table's rows, every NaN
    written as ``null``: what every metrics file (``metrics.json``, ``table7.json``) holds.

    A bare ``NaN`` is not JSON: NaN becomes ``null``, and any other non-finite number (an
    infinity) is refused with ``ValueError`` (``allow_nan=False``) instead of being written.
    """
    return json.dumps(_nan_as_none(metrics), allow_nan=False, **options)


def _nan_as_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {key: _nan_as_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_as_none(item) for item in value]
    return value


def _metrics_from_stats(stats: Sequence[float]) -> dict[str, float]:
    """pycocotools' stats in percent; its -1 ("undefined") becomes NaN."""
    return {
        name: float("nan") if stat == -1 else float(stat * 100)
        for name, stat in zip(METRIC_NAMES, stats, strict=True)
    }


@contextlib.contextmanager
def _pycocotools_output(verbose: bool) -> Iterator[None]:
    """Let pycocotools print only when asked; it prints progress and tables unconditionally."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _read_json(path: str | Path) -> Any:
    """The parsed json file, or a one-line error naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise EntityDataError(path, f"cannot read: {reason}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EntityDataError(path, f"not valid JSON: {err}") from err


def _predictions_and_source(predictions: list[dict] | str | Path) -> tuple[str, Any]:
    """The prediction list and the name that error messages should give its origin."""
    if isinstance(predictions, str | Path):
        return str(predictions), _read_json(predictions)
    return _IN_MEMORY, predictions


# --- torchmetrics wrapper -------------------------------------------------------------------

#: The metric's state lists, one tensor per ``update`` each, in the order they are decoded.
STATE_NAMES = ("image_ids", "scores", "mask_heights", "mask_widths", "counts_lengths", "counts")
#: A further state: the DDP rank that made each prediction (to drop the sampler's padding).
RANK_STATE = "ranks"


def encode_predictions(predictions: Sequence[Mapping], device: torch.device | str = "cpu") -> dict:
    """COCO results as flat tensors (one entry per prediction; RLE counts as concatenated bytes).

    Scores are float64 so that decoding gives back the exact Python floats, and with them
    pycocotools' ranking, ties included.
    """
    results = class_agnostic_results(list(predictions))
    counts = [_counts_bytes(pred["segmentation"]["counts"]) for pred in results]
    sizes = [[int(v) for v in pred["segmentation"]["size"]] for pred in results]

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return {
        "image_ids": tensor([int(pred["image_id"]) for pred in results], torch.int64),
        "scores": tensor([pred["score"] for pred in results], torch.float64),
        "mask_heights": tensor([h for h, _ in sizes], torch.int64),
        "mask_widths": tensor([w for _, w in sizes], torch.int64),
        "counts_lengths": tensor([len(c) for c in counts], torch.int64),
        "counts": torch.frombuffer(bytearray(b"".join(counts)), dtype=torch.uint8).to(device)
        if counts
        else tensor([], torch.uint8),
    }


def decode_predictions(states: Mapping[str, torch.Tensor]) -> list[dict]:
    """The COCO results that ``encode_predictions`` encoded, from states concatenated (as
    torchmetrics' ``cat`` reduction leaves them) over updates and ranks, in that order."""
    columns = {name: states[name].detach().cpu() for name in STATE_NAMES}
    lengths = columns["counts_lengths"].tolist()
    counts_bytes = columns["counts"].to(torch.uint8).numpy().tobytes()
    if sum(lengths) != len(counts_bytes):
        raise ValueError(f"RLE counts hold {len(counts_bytes)} bytes, lengths say {sum(lengths)}")
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return [
        {
            "image_id": image_id,
            "category_id": ENTITY_CATEGORY["id"],
            "segmentation": {
                "size": [height, width],
                "counts": counts_bytes[start:end].decode("ascii"),
            },
            "score": score,
        }
        for image_id, score, height, width, start, end in zip(
            columns["image_ids"].tolist(),
            columns["scores"].to(torch.float64).tolist(),
            columns["mask_heights"].tolist(),
            columns["mask_widths"].tolist(),
            offsets[:-1],
            offsets[1:],
            strict=True,
        )
    ]


def drop_padding(predictions: list[dict], ranks: Sequence[int]) -> list[dict]:
    """The predictions of each image from one rank only: the first rank that made any.

    ``DistributedSampler`` pads the ranks to equal length by repeating the first samples, and
    a repeated sample always lands on another rank than its original (the same rank only when
    there is no padding). So an image scored on two ranks is padding, whatever its predictions
    are; within a rank every prediction is kept, identical ones included (``overlapping``).
    """
    owner: dict[int, int] = {}
    kept = []
    for prediction, rank in zip(predictions, ranks, strict=True):
        if owner.setdefault(prediction["image_id"], rank) == rank:
            kept.append(prediction)
    return kept


def _current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _counts_bytes(counts: str | bytes) -> bytes:
    """Compressed RLE counts as bytes (pycocotools writes them ASCII-only)."""
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


class EntityAP(Metric):
    """AP^e over all predictions seen since the last ``reset``, gathered from every DDP rank.

    The state is kept as lists of tensors, not of Python dicts, because torchmetrics can only
    gather tensors between processes: each ``update`` appends one tensor per field (image ids,
    float64 scores, mask sizes, RLE-count lengths, and the RLE counts' bytes as uint8), and the
    ``cat`` reduction concatenates them rank after rank; ``compute`` decodes them back into COCO
    results and runs :func:`evaluate`. Lightning's distributed sampler pads the ranks with
    repeated images: each prediction also records its rank, and an image's predictions are
    kept from the first rank that scored it only (:func:`drop_padding`), so padding does not
    count an image twice while identical predictions of one image (``overlapping``) stay.
    ``update`` appends even for an empty list, so that every rank that saw a batch has tensors
    of the right dtype to gather; call it at least once on every rank. ``forward`` would run the
    whole evaluation per batch: use ``update``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, gt_json_path: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gt_json_path = Path(gt_json_path)
        for name in (*STATE_NAMES, RANK_STATE):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: list[dict]) -> None:
        """Keep the COCO results of a batch (``image_id``, RLE ``segmentation``, ``score``)."""
        encoded = encode_predictions(predictions, self.device)
        for name, tensor in encoded.items():
            getattr(self, name).append(tensor)
        ranks = torch.full_like(encoded["image_ids"], _current_rank())
        getattr(self, RANK_STATE).append(ranks)

    def compute(self) -> dict[str, float]:
        """:func:`evaluate` on every kept prediction (the sampler's padding dropped)."""
        return evaluate(self.gt_json_path, self.predictions())

    def predictions(self) -> list[dict]:
        """Every kept prediction (the sampler's padding dropped), rank after rank: this
        process's, or all processes' inside ``sync_context()``."""
        states = self._concatenated_states()
        return drop_padding(decode_predictions(states), states[RANK_STATE].tolist())

    def _concatenated_states(self) -> dict[str, torch.Tensor]:
        """Each state as one tensor: a list locally, already one tensor after a DDP sync."""
        states = {name: getattr(self, name) for name in (*STATE_NAMES, RANK_STATE)}
        if any(isinstance(value, list) and not value for value in states.values()):
            empty = encode_predictions([])
            return {**empty, RANK_STATE: empty["image_ids"]}
        return {name: dim_zero_cat(value) for name, value in states.items()}


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Print the AP^e of a results json as one line of JSON; 2 for an unusable input."""
    parser = argparse.ArgumentParser(
        prog="python -m entityseg.evaluation.entity_ap",
        description="Class-agnostic COCO mask AP (AP^e) of entity predictions, in percent.",
    )
    parser.add_argument("gt_json", help="entity ground truth, COCO instance json")
    parser.add_argument("predictions_json", help="COCO results json (a list of predictions)")
    parser.add_argument("--verbose", action="store_true", help="show pycocotools' output")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(args.gt_json, args.predictions_json, verbose=args.verbose)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(metrics_json(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
