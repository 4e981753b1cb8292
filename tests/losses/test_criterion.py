import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from entityseg.losses import criterion as criterion_module
from entityseg.losses.criterion import CropFormerCriterion, dice_loss, sigmoid_bce_loss
from entityseg.losses.point_sampling import point_sample, uncertain_points
from entityseg.models.outputs import CropFormerOutput, DecoderOutput

N, V, Q, SIZE = 2, 2, 6, 24  # images, views, queries, prediction side (targets are 4x)
BLOCK = 10  # entities are BLOCK x BLOCK squares at the prediction stride
TERMS = ("ce", "bce", "dice")


def block_targets(num_entities=3, seed=0):
    """targets[n][v]: entities are 4x-upsampled random blocks; entity 1 of image 0 is not in
    view 1 (outside its crop)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for n in range(N):
        views = []
        for v in range(V):
            low = torch.zeros(num_entities, SIZE, SIZE, dtype=torch.bool)
            for m in range(num_entities):
                y, x = torch.randint(1, SIZE - BLOCK, (2,), generator=generator).tolist()
                low[m, y : y + BLOCK, x : x + BLOCK] = True
            if n == 0 and v == 1:
                low[1] = False
            masks = low.repeat_interleave(4, 1).repeat_interleave(4, 2)
            views.append({"masks": masks, "ids": torch.arange(num_entities)})
        targets.append(views)
    return targets


def perfect_prediction(targets, magnitude=20.0):
    """Query m predicts entity m in every view, with confident scores where it is visible."""
    logits = torch.zeros(N, V, Q, 2)
    logits[..., 1] = magnitude  # no-entity
    masks = torch.full((N, V, Q, SIZE, SIZE), -magnitude)
    for n in range(N):
        for v in range(V):
            entity_masks = targets[n][v]["masks"]
            num_entities = entity_masks.shape[0]
            masks[n, v, :num_entities] = magnitude * (entity_masks[:, ::4, ::4].float() * 2 - 1)
            visible = entity_masks.flatten(1).any(1)  # [M]
            logits[n, v, :num_entities][visible] = torch.tensor([magnitude, 0.0])
    return DecoderOutput(logits, masks)


def random_prediction(seed, num_aux=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)

    def one():
        logits = torch.randn(N, V, Q, 2, generator=generator).requires_grad_(requires_grad)
        masks = 3 * torch.randn(N, V, Q, SIZE, SIZE, generator=generator)
        return DecoderOutput(logits, masks.requires_grad_(requires_grad))

    final = one()
    return replace(final, aux=[one() for _ in range(num_aux)])


def batch_view(prediction):
    """A batch-decoder prediction: one entity score per query, broadcast to every view."""
    logits = prediction.logits[:, :1].expand(-1, V, -1, -1)
    return DecoderOutput(logits, prediction.masks, [batch_view(a) for a in prediction.aux])


def test_perfect_predictions_give_near_zero_losses():
    torch.manual_seed(0)
    targets = block_targets()
    prediction = perfect_prediction(targets)
    criterion = CropFormerCriterion(num_points=2000)
    losses = criterion(CropFormerOutput(prediction, batch_view(prediction)), targets)
    # per target mask and view, unweighted; what is left sits on the entity edges, where the
    # stride-4 logits ramp while the full-resolution labels step (75% of points sample there)
    for level, masks_per_target in (("image", 1), ("batch", V)):
        assert losses[f"{level}/ce"] < 1e-6
        assert losses[f"{level}/bce"] / (5 * masks_per_target) < 0.08
        assert losses[f"{level}/dice"] / (5 * masks_per_target) < 0.08
    random_losses = criterion(
        CropFormerOutput(random_prediction(1), batch_view(random_prediction(2))), targets
    )
    for key in losses:
        assert random_losses[key] > 10 * losses[key] + 0.5


def test_gradients_reach_logits_and_masks():
    torch.manual_seed(0)
    image, batch = random_prediction(0, 2, True), random_prediction(1, 2, True)
    losses = CropFormerCriterion(num_points=500)(CropFormerOutput(image, batch), block_targets())
    losses["loss"].backward()
    for prediction in (image, batch):
        for p in (prediction, *prediction.aux):
            assert p.logits.grad.abs().sum() > 0
            assert p.masks.grad.abs().sum() > 0


def test_empty_targets():
    torch.manual_seed(0)
    no_entities = {
        "masks": torch.zeros(0, 4 * SIZE, 4 * SIZE, dtype=torch.bool),
        "ids": torch.zeros(0, dtype=torch.long),
    }
    targets = [[no_entities] * V for _ in range(N)]
    image, batch = random_prediction(0, 1, True), random_prediction(1, 1, True)
    losses = CropFormerCriterion(num_points=100)(CropFormerOutput(image, batch), targets)
    for level in ("image", "batch"):
        assert losses[f"{level}/ce"] > 0
        assert losses[f"{level}/bce"] == 0 and losses[f"{level}/dice"] == 0
    losses["loss"].backward()
    assert image.masks.grad is not None  # connected (zero) so DDP sees every parameter
    assert torch.isfinite(losses["loss"])


def test_view_without_targets_still_gets_ce():
    torch.manual_seed(0)
    targets = block_targets()
    targets[1][1]["masks"] = torch.zeros_like(targets[1][1]["masks"])  # no entity in this view
    prediction = perfect_prediction(block_targets())  # image 1, view 1 claims 3 entities
    losses = CropFormerCriterion(num_points=500)(CropFormerOutput(prediction), targets)
    assert losses["image/ce"] > 1.0  # its confident entity scores are now wrong
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("no_entity_weight", [0.1, 0.5])
def test_ce_uses_the_no_entity_weight(no_entity_weight):
    torch.manual_seed(0)
    targets = block_targets()
    # scores random, masks decide the matching
    prediction = replace(perfect_prediction(targets), logits=torch.randn(N, V, Q, 2))
    batch = batch_view(prediction)
    criterion = CropFormerCriterion(no_entity_weight=no_entity_weight, num_points=1000)
    losses = criterion(CropFormerOutput(prediction, batch), targets)

    weight = torch.tensor([1.0, no_entity_weight])  # written here, not read from the criterion
    classes = torch.ones(N, V, Q, dtype=torch.long)  # no-entity
    classes[:, :, :3] = 0  # query m predicts entity m
    classes[0, 1, 1] = 1  # entity 1 is not in view 1 of image 0: not a target there
    logits = prediction.logits.reshape(-1, 2)
    expected = F.cross_entropy(logits, classes.reshape(-1), weight=weight)  # weighted mean
    assert losses["image/ce"] == pytest.approx(2.0 * float(expected), rel=1e-5)

    batch_classes = torch.ones(N, Q, dtype=torch.long)
    batch_classes[:, :3] = 0  # all three entities of every image
    expected_batch = F.cross_entropy(
        batch.logits[:, 0].reshape(-1, 2), batch_classes.reshape(-1), weight=weight
    )
    assert losses["batch/ce"] == pytest.approx(2.0 * float(expected_batch), rel=1e-5)


def test_total_is_the_documented_weighted_sum():
    torch.manual_seed(0)
    targets = block_targets()
    criterion = CropFormerCriterion(num_points=300, image_level_weight=0.3, batch_level_weight=2.0)
    losses = criterion(CropFormerOutput(random_prediction(0, 1), random_prediction(1, 1)), targets)
    image_sum = sum(losses[f"image/{t}"] for t in TERMS)
    batch_sum = sum(losses[f"batch/{t}"] for t in TERMS)
    assert losses["loss"] == pytest.approx(float(0.3 * image_sum + 2.0 * batch_sum), rel=1e-6)

    baseline = criterion(CropFormerOutput(random_prediction(0, 1)), targets)
    assert set(baseline) == {"loss", "image/ce", "image/bce", "image/dice"}
    image_sum = sum(baseline[f"image/{t}"] for t in TERMS)
    assert baseline["loss"] == pytest.approx(float(image_sum), rel=1e-6)  # full weight


def test_aux_predictions_are_counted():
    torch.manual_seed(0)
    targets = block_targets()
    perfect = perfect_prediction(targets)
    # soft masks, so mask losses are not ~0
    prediction = DecoderOutput(torch.randn(N, V, Q, 2), perfect.masks / 10)
    criterion = CropFormerCriterion(num_points=4000)
    single = criterion(CropFormerOutput(prediction, batch_view(prediction)), targets)
    prediction = replace(prediction, aux=[DecoderOutput(prediction.logits, prediction.masks)] * 2)
    tripled = criterion(CropFormerOutput(prediction, batch_view(prediction)), targets)
    for key in single:
        if key.endswith("/ce"):
            assert tripled[key] == pytest.approx(3 * float(single[key]), rel=1e-5)
        else:  # the same up to the random points
            assert tripled[key] == pytest.approx(3 * float(single[key]), rel=0.1)


def test_mask_losses_are_normalised_by_the_number_of_target_masks():
    """Logits 0 give BCE log 2 at any point, so the BCE sum counts the matched masks."""
    torch.manual_seed(0)
    targets = block_targets(num_entities=4)  # 4 entities, 2 queries: half are matched
    prediction = DecoderOutput(torch.zeros(N, V, 2, 2), torch.zeros(N, V, 2, SIZE, SIZE))
    losses = CropFormerCriterion(num_points=200)(CropFormerOutput(prediction, prediction), targets)
    pairs = sum(int(t["masks"].flatten(1).any(1).sum()) for views in targets for t in views)
    assert losses["image/bce"] == pytest.approx(5 * math.log(2) * (N * V * 2) / pairs, rel=1e-5)
    # batch level: each matched entity has V masks, normalised by the number of entities
    assert losses["batch/bce"] == pytest.approx(5 * math.log(2) * (N * 2 * V) / (N * 4), rel=1e-5)


def test_normaliser_is_averaged_over_ranks(monkeypatch):
    monkeypatch.setattr(criterion_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(10.0))
    assert float(criterion_module.num_target_masks(6, torch.device("cpu"))) == 4.0
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t)
    assert float(criterion_module.num_target_masks(0, torch.device("cpu"))) == 1.0  # clamped


def test_bce_and_dice_match_a_naive_implementation():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 50, generator=generator)
    labels = torch.rand(3, 50, generator=generator).round()
    labels[2] = 0.0  # an empty target
    bce = dice = 0.0
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist(), strict=True):
        probs = [1 / (1 + math.exp(-x)) for x in row_logits]
        pointwise = [
            -(t * math.log(p) + (1 - t) * math.log(1 - p))
            for p, t in zip(probs, row_labels, strict=True)
        ]
        bce += sum(pointwise) / len(pointwise)
        inter = sum(p * t for p, t in zip(probs, row_labels, strict=True))
        dice += 1 - (2 * inter + 1) / (sum(probs) + sum(row_labels) + 1)
    assert float(sigmoid_bce_loss(logits, labels)) == pytest.approx(bce, rel=1e-5)
    assert float(dice_loss(logits, labels)) == pytest.approx(dice, rel=1e-5)


def test_uncertain_points_prefer_the_boundary():
    torch.manual_seed(0)
    ramp = torch.linspace(-10, 10, 64).expand(2, 1, 64, 64)  # boundary at x = 0.5
    points = uncertain_points(
        ramp, num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75
    )
    assert points.shape == (2, 400, 2)
    assert points.min() >= 0 and points.max() <= 1
    near = (points[..., 0] - 0.5).abs()
    assert near[:, :300].max() < near[:, 300:].mean()  # the 300 most uncertain come first
    assert uncertain_points(ramp[:, 0], 10, 3.0, 0.0).shape == (2, 10, 2)  # [B, H, W] input
    values = point_sample(ramp, points)
    assert values.shape == (2, 1, 400)


def test_dense_points_are_every_prediction_pixel_centre():
    from entityseg.losses.point_sampling import dense_points

    points = dense_points(3, 5)
    assert points.shape == (15, 2)
    assert points[0].tolist() == pytest.approx([0.1, 1 / 6])
    assert points[7].tolist() == pytest.approx([0.5, 0.5])  # row 1, column 2: (2.5/5, 1.5/3)
    maps = torch.randn(2, 1, 3, 5)
    # read from the prediction, every point is the logit itself, row by row
    torch.testing.assert_close(
        point_sample(maps, points[None].expand(2, -1, -1))[:, 0], maps.flatten(1)
    )


def test_dense_point_losses_match_a_naive_pixel_loop():
    """``num_points=None``: BCE and Dice on every stride-4 pixel; the target at a pixel centre
    is the mean of the 2 x 2 full-resolution target pixels around it."""
    targets = block_targets()
    prediction = random_prediction(3)
    criterion = CropFormerCriterion(num_points=None)
    loss = criterion.image_level
    num_masks = loss.num_masks(targets, torch.device("cpu"))
    matches = loss.matcher.match_image_level(prediction.logits, prediction.masks, targets)
    bce = dice = 0.0
    for n in range(N):
        for v in range(V):
            for q, m in zip(*matches[n][v], strict=True):
                target = targets[n][v]["masks"][m].double()  # [4 SIZE, 4 SIZE]
                logits = prediction.masks[n, v, q].double()  # [SIZE, SIZE]
                labels = torch.zeros(SIZE, SIZE, dtype=torch.float64)
                for i in range(SIZE):
                    for j in range(SIZE):
                        labels[i, j] = target[4 * i + 1 : 4 * i + 3, 4 * j + 1 : 4 * j + 3].mean()
                bce += F.binary_cross_entropy_with_logits(logits, labels).item()
                probs = logits.sigmoid()
                dice += 1 - (2 * (probs * labels).sum() + 1) / (probs.sum() + labels.sum() + 1)
    terms = loss.terms(prediction, targets, num_masks)
    assert terms[1].item() == pytest.approx(bce / num_masks.item(), rel=1e-5)
    assert terms[2].item() == pytest.approx(float(dice) / num_masks.item(), rel=1e-5)
    # deterministic: the same matching and losses on every call
    torch.testing.assert_close(loss.terms(prediction, targets, num_masks), terms)
