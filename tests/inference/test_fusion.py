"""Fusion of per-view predictions, on hand-made logits whose right answer is known.

Geometry of most tests: a 32 x 32 original image; every view is a 32 x 32 network input with
8 x 8 mask logits (stride 4); crops are the 16 x 16 quadrants, so a crop's mask cell is 2 x 2
original pixels and the full view's is 4 x 4. Logits of +-12 are used for sure pixels: bilinear
resizing by these integer factors puts the 0.5 crossing exactly on straight cell borders (it
rounds off inner corners, so the hand-made masks are bands or whole views).
"""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from entityseg.data.crops import crop_boxes as make_crop_boxes
from entityseg.inference.fusion import (
    Entities,
    entity_probabilities,
    fuse_entities,
    fused_probabilities,
    views_for_mode,
)
from entityseg.inference.settings import INFERENCE_MODES, InferenceSettings
from entityseg.models.outputs import CropFormerOutput, DecoderOutput

SIZE = 32
FULL = (0, 0, 32, 32)
TOP_LEFT, TOP_RIGHT = (0, 0, 16, 16), (16, 0, 32, 16)
BOTTOM_LEFT, BOTTOM_RIGHT = (0, 16, 16, 32), (16, 16, 32, 32)
SURE, NEVER = 12.0, -12.0


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def class_logits(entity_probs) -> torch.Tensor:
    """[Q, 2] logits whose softmax index 0 is each given entity probability."""
    p = torch.tensor(entity_probs, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=-1).float()


def empty_masks(num_views: int, num_queries: int, size: int = 8) -> torch.Tensor:
    return torch.full((num_views, num_queries, size, size), NEVER)


def batch_outputs(masks: torch.Tensor, entity_probs, image=None) -> CropFormerOutput:
    """Model outputs of one image (N = 1) with a batch decoder: masks [V, Q, h, w].

    ``image``: the image decoder's output; by default one that finds nothing (every mask
    NEVER), so that a batch mode reading it would find no entity.
    """
    num_views = masks.shape[0]
    logits = class_logits(entity_probs)[None, None].expand(1, num_views, -1, -1)
    if image is None:
        image = DecoderOutput(logits, torch.full_like(masks, NEVER)[None])
    return CropFormerOutput(image, DecoderOutput(logits, masks[None]))


def image_outputs(masks: torch.Tensor, logits: torch.Tensor) -> CropFormerOutput:
    """Image-level outputs only (Mask2Former): masks [V, Q, h, w], logits [V, Q, 2]."""
    return CropFormerOutput(DecoderOutput(logits[None], masks[None]))


def fuse(outputs, boxes, mode, valid=(SIZE, SIZE), orig=(SIZE, SIZE), **kwargs) -> Entities:
    crop_boxes = torch.tensor([boxes], dtype=torch.float32)
    settings = InferenceSettings(**kwargs)
    (entities,) = fuse_entities(
        outputs, crop_boxes, torch.tensor([valid]), torch.tensor([orig]), mode, settings
    )
    return entities


def region(rows: slice, cols: slice, size=(SIZE, SIZE)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def test_views_for_mode():
    assert views_for_mode("image_o", 5) == [0]
    assert views_for_mode("batch_o", 5) == [0]
    assert views_for_mode("batch_c", 5) == [1, 2, 3, 4]
    assert views_for_mode("batch_oc", 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="needs crop views"):
        views_for_mode("batch_c", 1)


def test_unknown_mode_and_missing_batch_decoder_are_clear_errors():
    masks = empty_masks(1, 2)
    outputs = image_outputs(masks, class_logits([0.9, 0.9])[None])
    with pytest.raises(ValueError, match="image_o.*batch_o.*batch_c.*batch_oc"):
        fuse(outputs, [FULL], "batch_x")
    for mode in ("batch_o", "batch_c", "batch_oc"):
        with pytest.raises(ValueError, match="batch-level decoder"):
            fuse(outputs, [FULL], mode)
    assert set(INFERENCE_MODES) == {"image_o", "batch_o", "batch_c", "batch_oc"}


def test_mask_split_across_two_crops_is_one_entity():
    # The entity is the band of rows 4..12: half in each top crop, across their seam at x = 16.
    masks = empty_masks(3, 1)
    masks[0, 0, 1:3, :] = SURE  # full view: 4 x 4 pixels per cell
    masks[1, 0, 2:6, :] = SURE  # top-left crop: 2 x 2 pixels per cell
    masks[2, 0, 2:6, :] = SURE  # top-right crop
    outputs = batch_outputs(masks, [0.9])
    expected = region(slice(4, 12), slice(0, 32))
    for mode in ("batch_c", "batch_oc", "batch_o"):
        entities = fuse(outputs, [FULL, TOP_LEFT, TOP_RIGHT], mode)
        assert len(entities) == 1, mode
        assert torch.equal(entities.masks()[0], expected), mode


def test_crop_only_entity():
    # Query 1 is missed by the full view (p = 0.2 < 0.5 everywhere) and sure in the top-left
    # crop's rows 0..8: (0.2 + 1) / 2 = 0.6 there in batch_oc.
    masks = empty_masks(2, 2)
    masks[0, 0, 6:8, :] = SURE  # query 0: an ordinary entity, rows 24..32
    masks[0, 1] = logit(0.2)
    masks[1, 1, 0:4, :] = SURE
    outputs = batch_outputs(masks, [0.8, 0.7])
    boxes = [FULL, TOP_LEFT]
    assert fuse(outputs, boxes, "batch_o").query_indices.tolist() == [0]
    for mode in ("batch_c", "batch_oc"):
        entities = fuse(outputs, boxes, mode)
        assert 1 in entities.query_indices.tolist(), mode
        mask = entities.masks()[entities.query_indices.tolist().index(1)]
        assert torch.equal(mask, region(slice(0, 8), slice(0, 16))), mode
    assert fuse(outputs, boxes, "batch_c").query_indices.tolist() == [1]  # the crop misses q0


@pytest.mark.parametrize(("probs", "winner"), [((0.6, 0.9), 1), ((0.9, 0.6), 0)])
def test_overlap_goes_to_the_higher_score(probs, winner):
    masks = empty_masks(1, 2)
    masks[0, 0, 0:4, :] = SURE  # rows 0..16
    masks[0, 1, 2:6, :] = SURE  # rows 8..24
    outputs = batch_outputs(masks, probs)
    first, second = region(slice(0, 16), slice(0, 32)), region(slice(8, 24), slice(0, 32))
    full = {0: first, 1: second}
    loser = 1 - winner
    entities = fuse(outputs, [FULL], "batch_o")
    got = dict(zip(entities.query_indices.tolist(), entities.masks(), strict=True))
    assert torch.equal(got[winner], full[winner])
    assert torch.equal(got[loser], full[loser] & ~full[winner])
    overlapping = fuse(outputs, [FULL], "batch_o", overlapping=True)
    got = dict(zip(overlapping.query_indices.tolist(), overlapping.masks(), strict=True))
    assert torch.equal(got[0], first) and torch.equal(got[1], second)


def test_views_are_averaged_where_they_cover():
    # Full view p = 0.8 everywhere, top-left crop p = 0.1: (0.8 + 0.1) / 2 = 0.45 there.
    masks = torch.empty(2, 1, 8, 8)
    masks[0].fill_(logit(0.8))
    masks[1].fill_(logit(0.1))
    boxes = [FULL, TOP_LEFT]
    fused = fused_probabilities(masks, boxes, [(SIZE, SIZE)] * 2, (SIZE, SIZE))[0]
    assert fused[5, 5].item() == pytest.approx(0.45, abs=1e-6)
    assert fused[20, 20].item() == pytest.approx(0.8, abs=1e-6)
    outputs = batch_outputs(masks, [0.9])
    assert fuse(outputs, boxes, "batch_o").masks()[0].all()
    oc_mask = fuse(outputs, boxes, "batch_oc").masks()[0]
    assert torch.equal(oc_mask, ~region(slice(0, 16), slice(0, 16)))
    assert len(fuse(outputs, boxes, "batch_c")) == 0  # 0.1 everywhere: nothing


def test_score_is_entity_prob_times_mean_fused_prob_in_the_final_mask():
    # q0: full p = 0.8 everywhere, top-right crop p = 0.95 -> 0.875 in that quadrant.
    # q1 (higher score) takes the bottom half from q0.
    masks = torch.empty(2, 2, 8, 8)
    masks[0, 0].fill_(logit(0.8))
    masks[1, 0].fill_(logit(0.95))
    masks[:, 1] = NEVER
    masks[0, 1, 4:8, :] = SURE
    outputs = batch_outputs(masks, [0.7, 0.9])
    entities = fuse(outputs, [FULL, TOP_RIGHT], "batch_oc")
    assert entities.query_indices.tolist() == [1, 0]
    q0_mask = entities.masks()[1]
    assert torch.equal(q0_mask, region(slice(0, 16), slice(0, 32)))
    mean_prob = (0.875 * 256 + 0.8 * 256) / 512  # not the release's mean of sigmoid(U^m)
    assert entities.scores[1].item() == pytest.approx(0.7 * mean_prob, abs=1e-5)
    assert entities.scores[0].item() == pytest.approx(0.9, abs=0.03)
    # overlapping: q0 keeps the whole image, so its mean includes the bottom-left quadrant
    overlapping = fuse(outputs, [FULL, TOP_RIGHT], "batch_oc", overlapping=True)
    score = overlapping.scores[overlapping.query_indices.tolist().index(0)].item()
    assert score == pytest.approx(0.7 * (0.875 * 256 + 0.8 * 768) / 1024, abs=1e-5)


def test_image_o_reads_view_0_of_the_image_decoder_only():
    image_masks = empty_masks(3, 2)
    image_masks[0, 0, 0:2, :] = SURE  # view 0: query 0 only, rows 0..8
    image_masks[1:, :, :, :] = SURE  # crops would fill everything
    image_logits = torch.stack([class_logits([0.6, 0.6])] + [class_logits([0.99, 0.99])] * 2)
    batch_masks = torch.full((3, 2, 8, 8), SURE)
    outputs = batch_outputs(
        batch_masks, [0.99, 0.99], image=image_outputs(image_masks, image_logits).image
    )
    entities = fuse(outputs, [FULL, TOP_LEFT, TOP_RIGHT], "image_o")
    assert entities.query_indices.tolist() == [0]
    assert torch.equal(entities.masks()[0], region(slice(0, 8), slice(0, 32)))
    assert entities.scores[0].item() == pytest.approx(0.6, abs=0.01)  # view 0's U^e, not 0.99


def test_max_entities_keeps_the_best_and_empty_masks_are_dropped():
    masks = empty_masks(1, 7)
    for q in range(5):  # five disjoint one-cell-row entities
        masks[0, q, q, :] = SURE
    masks[0, 6, 0:2, :] = SURE  # query 6 is hidden under better queries 0 and 1
    probs = [0.5, 0.9, 0.7, 0.8, 0.6, 0.99, 0.3]  # query 5 has no mask at all
    outputs = batch_outputs(masks, probs)
    entities = fuse(outputs, [FULL], "batch_o")
    assert entities.query_indices.tolist() == [1, 3, 2, 4, 0]
    assert torch.all(entities.scores[:-1] >= entities.scores[1:])
    top = fuse(outputs, [FULL], "batch_o", max_entities=2)
    assert top.query_indices.tolist() == [1, 3]
    assert torch.equal(top.scores, entities.scores[:2])
    assert len(fuse(outputs, [FULL], "batch_o", max_entities=0)) == 0


def test_padding_is_cut_before_resizing():
    # Original 24 x 32 = the valid region of a 32 x 32 padded input (mask 8 x 8).
    masks = empty_masks(1, 2)
    masks[0, 0, 0:3, :] = SURE  # rows 0..12
    masks[0, 1, 6:8, :] = SURE  # only in the padded rows 24..32
    outputs = batch_outputs(masks, [0.9, 0.95])
    entities = fuse(outputs, [(0, 0, 32, 24)], "batch_o", valid=(24, 32), orig=(24, 32))
    assert entities.query_indices.tolist() == [0]
    assert torch.equal(entities.masks()[0], region(slice(0, 12), slice(0, 32), size=(24, 32)))


def random_batch(seed: int) -> tuple[CropFormerOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images (50 x 70 and 40 x 60) with fixed4 crops and smooth random logits."""
    generator = torch.Generator().manual_seed(seed)
    num_views, num_queries = 5, 20
    coarse = torch.randn(2, num_views, num_queries, 3, 3, generator=generator) * 6
    masks = torch.nn.functional.interpolate(
        coarse.flatten(0, 2)[:, None], size=(8, 10), mode="bilinear", align_corners=False
    ).reshape(2, num_views, num_queries, 8, 10)
    logits = torch.randn(2, 1, num_queries, 2, generator=generator).expand(-1, num_views, -1, -1)
    nothing = DecoderOutput(logits, torch.full_like(masks, NEVER))  # the image decoder's
    outputs = CropFormerOutput(nothing, DecoderOutput(logits, masks))
    boxes = [[(0, 0, w, h), *make_crop_boxes(h, w, "fixed4", 0.7)] for h, w in ((50, 70), (40, 60))]
    image_sizes = torch.tensor([[28, 40], [30, 37]])
    return (
        outputs,
        torch.tensor(boxes, dtype=torch.float32),
        image_sizes,
        torch.tensor([[50, 70], [40, 60]]),
    )


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("mode", ["batch_o", "batch_c", "batch_oc"])
def test_query_chunks_do_not_change_the_result(mode, overlapping):
    outputs, boxes, image_sizes, orig_sizes = random_batch(0)
    results = [
        fuse_entities(
            outputs,
            boxes,
            image_sizes,
            orig_sizes,
            mode,
            InferenceSettings(overlapping=overlapping, query_chunk=c),
        )
        for c in (1, 3, 64)
    ]
    assert [len(e) for e in results[0]] != [0, 0]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a.rles == b.rles
            assert torch.equal(a.scores, b.scores)
            assert torch.equal(a.query_indices, b.query_indices)
    assert [e.image_size for e in results[0]] == [(50, 70), (40, 60)]


def test_non_overlapping_masks_are_disjoint_and_match_a_dense_reference():
    outputs, boxes, image_sizes, orig_sizes = random_batch(1)
    entities = fuse_entities(outputs, boxes, image_sizes, orig_sizes, "batch_oc")[0]
    masks = entities.masks()
    assert masks.sum(0).max() <= 1
    # dense reference: all queries fused at once, painted by ascending entity probability
    batch = outputs.batch
    fused = fused_probabilities(batch.masks[0], boxes[0].tolist(), [(28, 40)] * 5, (50, 70))
    probs = entity_probabilities(batch.logits[0, 0])
    id_map = torch.full((50, 70), -1)
    for q in torch.sort(probs, stable=True).indices.tolist():
        id_map[fused[q] > 0.5] = q
    for k, q in enumerate(entities.query_indices.tolist()):
        assert torch.equal(masks[k], id_map == q)
        expected = probs[q] * fused[q][id_map == q].mean()
        assert entities.scores[k].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(entities.query_indices.tolist()) == set(id_map.unique().tolist()) - {-1}


def test_rles_decode_with_pycocotools_and_coco_results():
    masks = empty_masks(1, 2)
    masks[0, 0, 1:3, :] = SURE
    masks[0, 1, 5:8, :] = SURE
    entities = fuse(batch_outputs(masks, [0.9, 0.8]), [FULL], "batch_o")
    expected = [region(slice(4, 12), slice(0, 32)), region(slice(20, 32), slice(0, 32))]
    for rle, mask in zip(entities.rles, expected, strict=True):
        assert isinstance(rle["counts"], str) and rle["size"] == [SIZE, SIZE]
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())
    assert entities.masks(SIZE, SIZE).shape == (2, SIZE, SIZE)
    with pytest.raises(ValueError):
        entities.masks(10, 10)
    records = entities.to_coco(image_id=7)
    assert [set(r) for r in records] == [{"image_id", "category_id", "segmentation", "score"}] * 2
    assert all(r["image_id"] == 7 and r["category_id"] == 1 for r in records)
    assert [r["score"] for r in records] == entities.scores.tolist()
    json.dumps(records)
    with_boxes = entities.to_coco(image_id=7, include_bbox=True)
    assert with_boxes[0]["bbox"] == [0.0, 4.0, 32.0, 8.0]


def test_scoring_at_least_keeps_the_entities_at_or_above_the_threshold():
    masks = empty_masks(1, 3)
    for k in range(3):
        masks[0, k, 2 * k : 2 * k + 2, :] = SURE
    entities = fuse(batch_outputs(masks, [0.9, 0.8, 0.7]), [FULL], "batch_o")
    threshold = float(entities.scores[1])
    kept = entities.scoring_at_least(threshold)
    assert kept.rles == entities.rles[:2] and kept.scores.tolist() == entities.scores[:2].tolist()
    assert kept.query_indices.tolist() == entities.query_indices[:2].tolist()
    assert kept.image_size == entities.image_size
    assert len(entities.scoring_at_least(1.0)) == 0 and len(entities) == 3  # a copy


def test_no_entities():
    entities = fuse(batch_outputs(empty_masks(1, 3), [0.9] * 3), [FULL], "batch_o")
    assert len(entities) == 0 and entities.scores.shape == (0,)
    assert entities.masks().shape == (0, SIZE, SIZE)
    assert entities.to_coco(1) == []


def reference_case(shared_data, name: str, index: int, mode: str):
    """The release's outputs of one image as our model outputs, and its entities."""
    folder = shared_data / "official_reference" / name
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    record = json.loads((folder / "entities.json").read_text())[index]
    height, width = record["height"], record["width"]
    sizes = [tuple(outputs[f"{index}.image"].shape[-2:])]
    if mode == "image_o":
        model_outputs = image_outputs(
            outputs[f"{index}.image_level.pred_masks"], outputs[f"{index}.image_level.pred_logits"]
        )
        boxes = [(0, 0, width, height)]
    else:
        masks = outputs[f"{index}.batch_level.pred_masks"][0].transpose(0, 1)  # [V, Q, h, w]
        logits = outputs[f"{index}.batch_level.pred_logits"][0]
        image = image_outputs(
            outputs[f"{index}.image_level.pred_masks"], outputs[f"{index}.image_level.pred_logits"]
        ).image
        batch = DecoderOutput(logits[None, None].expand(1, len(masks), -1, -1), masks[None])
        model_outputs = CropFormerOutput(image, batch)
        boxes = [(0, 0, width, height), *outputs[f"{index}.crop_region"].tolist()]
        sizes += [tuple(outputs[f"{index}.image_crop"].shape[-2:])] * (len(boxes) - 1)
    return model_outputs, boxes, sizes, (height, width), record


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("mask2former_tiny", "image_o"),
        ("cropformer_tiny", "batch_oc"),
        ("cropformer_hornet_tiny", "batch_oc"),
    ],
)
@pytest.mark.parametrize("index", [0, 1])
def test_matches_the_release(shared_data, name, mode, index):
    """Same masks as the release; its scores are ours with the double sigmoid put back."""
    outputs, boxes, sizes, orig, record = reference_case(shared_data, name, index, mode)
    entities = fuse(outputs, boxes, mode, valid=sizes, orig=orig)
    release = {
        rle["counts"]: score
        for rle, score in zip(record["segmentations"], record["scores"], strict=True)
        if mask_utils.area(rle) > 0
    }
    assert sorted(rle["counts"] for rle in entities.rles) == sorted(release)
    prediction = outputs.image if mode == "image_o" else outputs.batch
    probs = entity_probabilities(prediction.logits[0, 0])
    fused = fused_probabilities(prediction.masks[0, : len(boxes)], boxes, sizes, orig)
    for rle, query, score, mask in zip(
        entities.rles,
        entities.query_indices.tolist(),
        entities.scores,
        entities.masks(),
        strict=True,
    ):
        assert score.item() == pytest.approx((probs[query] * fused[query][mask].mean()).item())
        release_score = probs[query] * fused[query][mask].sigmoid().mean()
        assert release[rle["counts"]] == pytest.approx(release_score.item(), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlapping", [False, True])
def test_cuda_outputs_give_the_cpu_entities(overlapping):
    outputs, boxes, image_sizes, orig_sizes = random_batch(2)
    on_cuda = CropFormerOutput(
        *(
            DecoderOutput(out.logits.cuda(), out.masks.cuda())
            for out in (outputs.image, outputs.batch)
        )
    )
    args = (boxes, image_sizes, orig_sizes, "batch_oc")
    settings = InferenceSettings(overlapping=overlapping)
    cpu = fuse_entities(outputs, *args, settings)
    cuda = fuse_entities(on_cuda, *args, settings)
    for a, b in zip(cpu, cuda, strict=True):
        assert b.scores.device.type == "cpu"
        assert torch.equal(a.query_indices, b.query_indices)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
        differ = (a.masks() ^ b.masks()).sum().item()
        assert differ <= 0.001 * a.masks().sum().item() + 2


def test_a_constant_crop_view_fills_exactly_its_box():
    """The paste of inference: a view's probabilities land in its box, nothing outside."""
    logit = math.log(0.75 / 0.25)
    view_masks = torch.full((1, 2, 4, 4), logit)  # [V', q, h', w']: a 16 x 16 padded input
    fused = fused_probabilities(view_masks, [(3, 4, 13, 9)], [(16, 16)], (12, 20))
    assert fused.shape == (2, 12, 20)
    inside = torch.zeros(12, 20, dtype=torch.bool)
    inside[4:9, 3:13] = True
    torch.testing.assert_close(fused[:, inside], torch.full((2, 50), 0.75))
    assert torch.all(fused[:, ~inside] == 0)


def test_a_box_outside_the_image_is_refused():
    with pytest.raises(ValueError, match="not inside"):
        fused_probabilities(torch.zeros(1, 1, 4, 4), [(0, 0, 30, 10)], [(16, 16)], (10, 20))
