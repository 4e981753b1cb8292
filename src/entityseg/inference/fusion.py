"""Per-view predictions -> entities in the original image's pixels: the four modes of Table 7.

Modes (``mode``):
  * ``image_o``: the image-level decoder on the full image I^O only (view 0 of
    ``outputs.image``), the single-scale Mask2Former row.
  * ``batch_o``: the batch-level decoder, full-image masks only (view 0 of ``outputs.batch``).
  * ``batch_c``: the batch-level decoder, crop masks I^C only (views 1..), pasted back into the
    original image; pixels no crop covers get probability 0 from them.
  * ``batch_oc``: the batch-level decoder, full image and crops (CropFormer as released).

Per query, in the order of the release's ``CropFormer.inference_whole_views`` (and, for one
view, of its Mask2Former ``instance_inference_nonoverlap``):
  1. each used view's stride-4 mask logits are upsampled bilinearly to the padded network input
     (4h' x 4w'), cut to the view's valid h x w (detectron2's ``sem_seg_postprocess``), resized
     bilinearly (``align_corners=False``) to the view's box in the original image, and only then
     put through the sigmoid: logits are resized, not probabilities;
  2. the used views' probabilities are averaged per pixel over the views whose box covers that
     pixel -> the fused mask probability U^m;
  3. foreground = U^m > 0.5;
  4. non-overlap: queries are painted in ascending order of their entity probability U^e
     (softmax index 0; for ``batch_*`` the batch query's shared score), so each pixel goes to
     the highest-scoring query whose foreground holds it;
  5. score = U^e x mean of U^m inside the final (painted) mask.
No query is filtered before fusion: the release keeps all Q queries (``topk(num_queries)``; its
Mask2Former takes ``topk(DETECTIONS_PER_IMAGE)`` with 100 = Q) and has no score threshold.

Where we differ from the release:
  * the mask score is the mean of U^m; the release averages ``sigmoid(U^m)``, a second sigmoid
    on probabilities, which squeezes every mask score into (0.62, 0.73] (its Mask2Former entity
    inference does the same); ours lie in (0.5, 1], so scores differ and can rank differently
    (the masks do not change);
  * empty masks (queries that never pass 0.5 or lose every pixel) are dropped; the release
    returns them with score 0;
  * at most ``max_entities`` entities are kept, by final score, after fusion; the release
    returns all Q (the same when Q <= max_entities);
  * ties in U^e are painted in a fixed order (stable sort: the higher query index wins); the
    release's ``torch.sort`` leaves it open;
  * ``overlapping=True`` skips step 4: each query keeps its thresholded U^m and is scored over
    it (the paper's "AP" beside AP^e);
  * ``image_sizes`` may give a valid size per view (the release's crop views can differ in size
    from the full view).

``compat="release"`` undoes those differences, to reproduce the release's entities exactly: the
mask score averages ``sigmoid(U^m)`` over the mask (``sum / (area + 1e-6)``), every query is
returned (empty masks with score 0) and the order is the release's, descending U^e.

Memory: masks are made at the original resolution H x W for ``query_chunk`` queries at a time;
Q x H x W float masks never exist. Peak, beyond the network outputs, about
``query_chunk x H x W x 4`` bytes (U^m of one chunk) + ``query_chunk x box area x 4`` (one resized
crop view) + ``query_chunk x 4h' x 4w' x 4`` (one view's upsampled logits) +
``H x W x (2 + 4 + 4 + 1)`` (int16 entity-id map, float winning probability, view coverage, one
foreground mask). A 4000 x 3000 photo, 16 queries per chunk, delta 0.7 crops, 800 x 1088 input:
about 0.77 + 0.38 + 0.06 + 0.13 GB = 1.3 GB (1.4 GB measured on the CPU). RLEs are encoded
on the CPU from the final id map (plus a transposed int16 copy, H x W x 2 bytes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from entityseg.data.coco_entity import ImageInput, rgb_image
from entityseg.inference.settings import InferenceSettings, check_mode
from entityseg.models.outputs import CropFormerOutput, DecoderOutput
from entityseg.viz import draw_boxes, id_map_from_rles, overlay_id_map

#: Foreground threshold on the fused mask probability U^m.
MASK_THRESHOLD = 0.5


#: The network's masks are at stride 4 of the padded input.
MASK_STRIDE = 4

_NO_ENTITY = -1
_ROW_BLOCK = 256  # rows per bincount when summing the id map, to bound the int64 temporary


Box = tuple[int, int, int, int]


@dataclass(repr=False)
class Entities:
    """Entities of one image in its original pixels, best score first (all on the CPU).

    What ``EntitySegmenter`` returns, ``predict`` writes and ``evaluate`` scores: masks as COCO
    RLE (``rles``; dense with :meth:`masks`), ``scores``, and what is derived from them
    (``areas``, ``boxes``, :meth:`to_coco`, :meth:`to_id_map`, :meth:`overlay`).
    """

    rles: list[dict]  # COCO RLE: {"size": [H, W], "counts": str}
    scores: torch.Tensor  # float[K], descending
    query_indices: torch.Tensor  # long[K], the query each entity comes from
    image_size: tuple[int, int]  # (H, W) of the original image
    #: float[k, 4] the test crops I^C the mode fused, (x0, y0, x1, y1) in the image's pixels:
    #: none for Image-O and Batch-O (the full view alone), or when not known
    crop_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))

    def __len__(self) -> int:
        return len(self.rles)

    def __repr__(self) -> str:
        """One line (a notebook cell shows it): how many, of what image, which scores."""
        height, width = self.image_size
        scores = f", scores {self.scores.min():.2f}-{self.scores.max():.2f}" if len(self) else ""
        crops = f", {len(self.crop_boxes)} crops" if len(self.crop_boxes) else ""
        return f"Entities({len(self)} of a {width}x{height} image{scores}{crops})"

    @property
    def areas(self) -> torch.Tensor:
        """long[K]: pixels of each mask (pycocotools ``area`` of the RLE)."""
        if not self.rles:
            return torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(mask_utils.area(self.rles).astype(np.int64))

    @property
    def boxes(self) -> torch.Tensor:
        """float[K, 4]: each mask's bounding box as (x0, y0, x1, y1), end exclusive (the
        convention of ``crop_boxes``; COCO's (x, y, w, h) is in :meth:`to_coco`'s ``bbox``)."""
        if not self.rles:
            return torch.zeros(0, 4)
        xywh = torch.from_numpy(mask_utils.toBbox(self.rles)).float()  # [K, 4]
        return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)

    def masks(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Dense masks bool[K, H, W] (pycocotools decode); for small images, tests and plots.

        ``height``/``width`` are optional and must match ``image_size`` when given.
        """
        expected = (height or self.image_size[0], width or self.image_size[1])
        if expected != tuple(self.image_size):
            raise ValueError(f"entities are {self.image_size}, not {expected}")
        if not self.rles:
            return torch.zeros((0, *self.image_size), dtype=torch.bool)
        decoded = mask_utils.decode(self.rles)  # uint8 [H, W, K]
        return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).bool()

    def to_coco(self, image_id: int, include_bbox: bool = False) -> list[dict]:
        """COCO results records (``category_id`` 1) that pycocotools ``loadRes`` reads as they
        are: what ``predict`` writes and ``evaluate`` scores.

        No ``bbox`` by default: with one, ``loadRes`` takes each area from the box instead of
        the mask, which moves entities between the S/M/L ranges.
        """
        bboxes = mask_utils.toBbox(self.rles).tolist() if include_bbox and self.rles else []
        records = []
        for k, (rle, score) in enumerate(zip(self.rles, self.scores.tolist(), strict=True)):
            record = {
                "image_id": int(image_id),
                "category_id": 1,
                "segmentation": rle,
                "score": float(score),
            }
            if include_bbox:
                record["bbox"] = bboxes[k]
            records.append(record)
        return records

    def scoring_at_least(self, threshold: float) -> Entities:
        """The entities whose score is at least ``threshold``, in the same order."""
        keep = self.scores >= threshold
        return replace(
            self,
            rles=[rle for rle, kept in zip(self.rles, keep.tolist(), strict=True) if kept],
            scores=self.scores[keep],
            query_indices=self.query_indices[keep],
        )

    def to_id_map(self) -> np.ndarray:
        """uint16 [H, W]: 0 where no entity, k + 1 on entity k (best first): the content of
        ``predict``'s 16-bit PNG."""
        return id_map_from_rles(self.rles, *self.image_size)

    def overlay(
        self, image: ImageInput, boxes: bool = True, id_map: np.ndarray | None = None
    ) -> np.ndarray:
        """uint8 RGB [H, W, 3]: the entities coloured over ``image`` (this image, as the
        segmenter took it: a path, a PIL image or an RGB uint8 array) with white outlines and,
        with ``boxes``, the crops I^C drawn: ``predict``'s overlay picture. ``id_map``: this
        image's :meth:`to_id_map` when already made (its masks are not decoded again)."""
        image = rgb_image(image)
        if image.shape[:2] != tuple(self.image_size):
            raise ValueError(
                f"the entities are of a {self.image_size[1]}x{self.image_size[0]} image, "
                f"not of this {image.shape[1]}x{image.shape[0]} one"
            )
        picture = overlay_id_map(image, self.to_id_map() if id_map is None else id_map)
        return draw_boxes(picture, self.crop_boxes.tolist()) if boxes else picture


def decoder_for_mode(mode: str) -> str:
    """The decoder a mode reads: ``"image"`` for ``image_o``, else ``"batch"``."""
    check_mode(mode)
    return "image" if mode == "image_o" else "batch"


def views_for_mode(mode: str, num_views: int) -> list[int]:
    """Indices of the views a mode fuses: view 0 is I^O, views 1.. are the crops I^C."""
    check_mode(mode)
    if num_views < 1:
        raise ValueError(f"num_views={num_views}: there must be at least the full view")
    if mode in ("image_o", "batch_o"):
        return [0]
    if num_views < 2:
        raise ValueError(f"mode {mode!r} needs crop views, but there is only the full view")
    return list(range(1, num_views)) if mode == "batch_c" else list(range(num_views))


def fuse_entities(
    outputs: CropFormerOutput,
    crop_boxes: torch.Tensor,
    image_sizes: torch.Tensor,
    orig_sizes: torch.Tensor,
    mode: str,
    settings: InferenceSettings | None = None,
) -> list[Entities]:
    """Entities of every image of a batch, in original image coordinates (one per image).

    ``outputs``: the model's :class:`~entityseg.models.outputs.CropFormerOutput`, whose
    decoders' ``logits`` are [N, V, Q, 2] and ``masks`` [N, V, Q, h', w'] (stride-4 logits of
    the padded input);
    ``crop_boxes`` float[N, V, 4] (x0, y0, x1, y1) in original pixels, view 0 = whole image;
    ``image_sizes`` long[N, 2] (or [N, V, 2]) the valid (h, w) of the views in the network input;
    ``orig_sizes`` long[N, 2] (H, W). Outputs may be on any device; results are on the CPU.
    ``settings``: ``max_entities``, ``overlapping``, ``query_chunk`` and ``compat``
    (``release``: the release's scores and order, see the module docstring); default
    :class:`~entityseg.inference.settings.InferenceSettings`'s.
    """
    check_mode(mode)
    settings = settings or InferenceSettings()
    prediction = _decoder_outputs(outputs, mode)
    logits, masks = prediction.logits, prediction.masks  # [N, V, Q, 2], [N, V, Q, h', w']
    num_images, num_views = masks.shape[:2]
    views = views_for_mode(mode, num_views)
    if crop_boxes.shape[0] != num_images or crop_boxes.shape[1] <= views[-1]:
        raise ValueError(f"crop_boxes {tuple(crop_boxes.shape)} do not match {num_views} views")
    valid_sizes = _sizes_per_view(image_sizes, num_images, num_views)  # [N][V] of (h, w)
    return [
        fuse_image_entities(
            logits[n, 0],  # image_o: view 0; batch: the same score in every view
            masks[n, views],
            [tuple(crop_boxes[n, v].tolist()) for v in views],
            [valid_sizes[n][v] for v in views],
            tuple(int(s) for s in orig_sizes[n].tolist()),
            settings,
        )
        for n in range(num_images)
    ]


def fuse_image_entities(
    entity_logits: torch.Tensor,
    view_masks: torch.Tensor,
    boxes: Sequence[Sequence[float]],
    valid_sizes: Sequence[tuple[int, int]],
    orig_size: tuple[int, int],
    settings: InferenceSettings | None = None,
) -> Entities:
    """Entities of one image from the views it uses.

    ``entity_logits`` [Q, 2]; ``view_masks`` [V', Q, h', w'] of the used views; ``boxes`` and
    ``valid_sizes`` one per used view; ``settings`` as :func:`fuse_entities` takes them.
    """
    settings = settings or InferenceSettings()
    overlapping, query_chunk = settings.overlapping, settings.query_chunk
    num_queries = view_masks.shape[1]
    if num_queries > torch.iinfo(torch.int16).max:
        raise ValueError(f"{num_queries} queries do not fit the int16 entity-id map")
    image_size = (int(orig_size[0]), int(orig_size[1]))
    if num_queries == 0:
        return Entities([], torch.zeros(0), torch.zeros(0, dtype=torch.long), image_size)
    entity_probs = entity_probabilities(entity_logits).to(view_masks.device)  # U^e [Q]
    paint_order = torch.sort(entity_probs, stable=True).indices  # ascending: the last one wins
    pixel_boxes = [_box_pixels(box, orig_size) for box in boxes]
    coverage = _view_coverage(pixel_boxes, orig_size, view_masks.device)
    chunks = _fused_chunks(
        view_masks, paint_order, pixel_boxes, valid_sizes, orig_size, coverage, query_chunk
    )
    release = settings.fusion_compat == "release"
    if overlapping:
        areas, prob_sums, rles = _overlapping_masks(chunks, num_queries, view_masks.device)
    else:
        id_map, areas, prob_sums = _non_overlapping_masks(
            chunks, num_queries, orig_size, double_sigmoid=release
        )
    if release:  # every query, descending U^e (the reverse of the painting order)
        scores = (entity_probs.double() * prob_sums / (areas + 1e-6)).float()
        kept = paint_order.flip(0)
    else:
        scores = (entity_probs.double() * prob_sums / areas.clamp(min=1)).float()
        kept = _top_entities(scores, areas, settings.max_entities)  # long[K], descending score
    if not overlapping:
        rles = _encode_id_map(id_map, kept.tolist())
    return Entities(
        rles=[rles[q] for q in kept.tolist()],
        scores=scores[kept].cpu(),
        query_indices=kept.cpu(),
        image_size=image_size,
    )


def entity_probabilities(entity_logits: torch.Tensor) -> torch.Tensor:
    """U^e [Q]: softmax over (entity, no-entity) logits [Q, 2], entity = index 0."""
    return F.softmax(entity_logits.float(), dim=-1)[:, 0]


def view_probabilities(
    mask_logits: torch.Tensor, valid_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """One view's mask probabilities resized to its box: [q, h', w'] logits -> [q, bh, bw].

    As detectron2's ``sem_seg_postprocess``: upsample to the padded input, drop the padding
    (so a mask in the padded area gives nothing), resize; sigmoid last, as the release does.
    """
    mask_h, mask_w = mask_logits.shape[-2:]
    valid_h, valid_w = (int(s) for s in valid_size)
    if not (0 < valid_h <= MASK_STRIDE * mask_h and 0 < valid_w <= MASK_STRIDE * mask_w):
        raise ValueError(f"valid size {valid_size} is outside the padded input of these masks")
    logits = mask_logits.float()[:, None]  # [q, 1, h', w']
    padded_size = (MASK_STRIDE * mask_h, MASK_STRIDE * mask_w)
    padded = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=False)
    valid = padded[..., :valid_h, :valid_w]
    resized = F.interpolate(valid, size=tuple(out_size), mode="bilinear", align_corners=False)
    return resized[:, 0].sigmoid_()


def fused_probabilities(
    view_masks: torch.Tensor,
    boxes: Sequence[Sequence[float]],
    valid_sizes: Sequence[tuple[int, int]],
    orig_size: tuple[int, int],
) -> torch.Tensor:
    """U^m [q, H, W] of some queries: their views' probabilities averaged where they cover.

    ``view_masks`` [V', q, h', w']. Mostly for tests and plots; inference fuses chunk by chunk.
    """
    pixel_boxes = [_box_pixels(box, orig_size) for box in boxes]
    coverage = _view_coverage(pixel_boxes, orig_size, view_masks.device)
    return _fuse_views(view_masks, pixel_boxes, valid_sizes, orig_size, coverage)


def encode_mask(mask: torch.Tensor) -> dict:
    """COCO RLE (``counts`` as str) of a bool mask [H, W] on any device."""
    columns_first = mask.t().contiguous().cpu().numpy()  # [W, H] C order = [H, W] Fortran order
    return _encode_fortran(columns_first.T)


def _encode_fortran(mask: np.ndarray) -> dict:
    """RLE of a Fortran-ordered bool [H, W] array, without copying it."""
    rle = mask_utils.encode(mask.view(np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _decoder_outputs(outputs: CropFormerOutput, mode: str) -> DecoderOutput:
    """The decoder outputs a mode reads, with a clear error when the model has no batch level."""
    prediction = outputs.image if decoder_for_mode(mode) == "image" else outputs.batch
    if prediction is None:
        raise ValueError(
            f"mode {mode!r} needs the batch-level decoder, but outputs.batch is None "
            "(a Mask2Former baseline, or the model ran with batch_level=False); use 'image_o'"
        )
    return prediction


def _sizes_per_view(
    image_sizes: torch.Tensor, num_images: int, num_views: int
) -> list[list[tuple[int, int]]]:
    """Valid (h, w) of every view: ``[N, 2]`` (one size for all views) or ``[N, V, 2]``."""
    sizes = torch.as_tensor(image_sizes).cpu()
    if sizes.dim() == 2:
        sizes = sizes[:, None].expand(-1, num_views, -1)
    if sizes.dim() != 3 or sizes.shape[0] != num_images or sizes.shape[1] < num_views:
        raise ValueError(f"image_sizes {tuple(sizes.shape)} do not match {num_images} images")
    return [[(int(h), int(w)) for h, w in per_image.tolist()] for per_image in sizes]


def _box_pixels(box: Sequence[float], orig_size: tuple[int, int]) -> Box:
    """A view's box as integer pixels, checked to lie inside the original image."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    height, width = orig_size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} is not inside an image of {width}x{height}")
    return x0, y0, x1, y1


def _view_coverage(
    boxes: Sequence[Box], orig_size: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """How many used views cover each pixel, float[H, W] clamped to >= 1; None for one view."""
    if len(boxes) == 1:
        return None
    coverage = torch.zeros(orig_size, dtype=torch.float32, device=device)
    for x0, y0, x1, y1 in boxes:
        coverage[y0:y1, x0:x1] += 1
    return coverage.clamp_(min=1)  # uncovered pixels have a zero sum: they stay 0


def _fuse_views(
    view_masks: torch.Tensor,
    boxes: Sequence[Box],
    valid_sizes: Sequence[tuple[int, int]],
    orig_size: tuple[int, int],
    coverage: torch.Tensor | None,
) -> torch.Tensor:
    """U^m [q, H, W]: sum of the views' probabilities in their boxes / coverage."""
    height, width = orig_size
    fused = None
    for masks, (x0, y0, x1, y1), valid in zip(view_masks, boxes, valid_sizes, strict=True):
        probs = view_probabilities(masks, valid, (y1 - y0, x1 - x0))  # [q, bh, bw]
        if fused is None and probs.shape[-2:] == (height, width):
            fused = probs  # the full view starts the sum: no extra H x W buffer
            continue
        if fused is None:
            fused = probs.new_zeros((probs.shape[0], height, width))
        fused[:, y0:y1, x0:x1] += probs
        del probs
    if coverage is not None:
        fused.div_(coverage)
    return fused


def _fused_chunks(
    view_masks: torch.Tensor,
    order: torch.Tensor,
    boxes: Sequence[Box],
    valid_sizes: Sequence[tuple[int, int]],
    orig_size: tuple[int, int],
    coverage: torch.Tensor | None,
    query_chunk: int,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(query indices, U^m [c, H, W]) of ``query_chunk`` queries at a time, in ``order``."""
    for start in range(0, len(order), query_chunk):
        queries = order[start : start + query_chunk]
        fused = _fuse_views(view_masks[:, queries], boxes, valid_sizes, orig_size, coverage)
        yield queries.tolist(), fused
        del fused


def _non_overlapping_masks(
    chunks: Iterator[tuple[list[int], torch.Tensor]],
    num_queries: int,
    orig_size: tuple[int, int],
    double_sigmoid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint queries in the chunks' (ascending score) order into an id map.

    Returns the int16 id map [H, W] (-1 = no entity), and per query the final area and the sum
    of U^m (of ``sigmoid(U^m)`` with ``double_sigmoid``, as the release scores) over it (float64
    [Q]).
    """
    id_map = winning_prob = None
    for queries, fused in chunks:
        if id_map is None:
            id_map = torch.full(orig_size, _NO_ENTITY, dtype=torch.int16, device=fused.device)
            winning_prob = torch.zeros(orig_size, dtype=torch.float32, device=fused.device)
        for query, probs in zip(queries, fused, strict=True):
            foreground = probs > MASK_THRESHOLD
            id_map.masked_fill_(foreground, query)
            values = probs.sigmoid() if double_sigmoid else probs
            torch.where(foreground, values, winning_prob, out=winning_prob)
        del fused, probs, values  # free this chunk before the generator makes the next one
    areas, prob_sums = _sums_per_entity(id_map, winning_prob, num_queries)
    return id_map, areas, prob_sums


def _sums_per_entity(
    id_map: torch.Tensor, values: torch.Tensor, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel count and sum of ``values`` per id of the map, float64 [Q] each, in row blocks."""
    areas = torch.zeros(num_queries + 1, dtype=torch.float64, device=id_map.device)
    sums = torch.zeros_like(areas)
    for start in range(0, id_map.shape[0], _ROW_BLOCK):
        ids = id_map[start : start + _ROW_BLOCK].flatten().long() + 1  # 0 = no entity
        weights = values[start : start + _ROW_BLOCK].flatten().double()
        areas += torch.bincount(ids, minlength=num_queries + 1)
        sums += torch.bincount(ids, weights=weights, minlength=num_queries + 1)
    return areas[1:], sums[1:]


def _overlapping_masks(
    chunks: Iterator[tuple[list[int], torch.Tensor]], num_queries: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict[int, dict]]:
    """Each query's thresholded U^m, encoded straight away: areas, U^m sums, RLEs by query."""
    areas = torch.zeros(num_queries, dtype=torch.float64, device=device)
    sums = torch.zeros_like(areas)
    rles = {}
    for queries, fused in chunks:
        for query, probs in zip(queries, fused, strict=True):
            foreground = probs > MASK_THRESHOLD
            areas[query] = float(foreground.sum())
            if areas[query] > 0:
                sums[query] = float((probs * foreground).sum(dtype=torch.float64))
                rles[query] = encode_mask(foreground)
        del fused, probs  # free this chunk before the generator makes the next one
    return areas, sums, rles


def _top_entities(scores: torch.Tensor, areas: torch.Tensor, max_entities: int) -> torch.Tensor:
    """Query indices of the non-empty masks with the best scores, best first (stable)."""
    candidates = torch.nonzero(areas > 0).flatten()
    ranked = torch.sort(scores[candidates], descending=True, stable=True).indices
    return candidates[ranked][:max_entities]


def _encode_id_map(id_map: torch.Tensor, queries: Sequence[int]) -> dict[int, dict]:
    """RLE of each query's region of the id map, from one transposed CPU copy."""
    columns_first = id_map.t().contiguous().cpu().numpy()  # [W, H] = Fortran-ordered [H, W]
    return {q: _encode_fortran((columns_first == q).T) for q in queries}
