import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from entityseg.losses.matcher import HungarianMatcher, batch_level_targets
from entityseg.losses.point_sampling import point_sample
from entityseg.models.outputs import DecoderOutput


def random_problem(generator, num_queries, num_targets, num_views=1, size=8):
    logits = torch.randn(num_queries, 2, generator=generator)
    masks = 3 * torch.randn(num_queries, num_views, size, size, generator=generator)
    targets = torch.rand(num_targets, num_views, 4 * size, 4 * size, generator=generator) > 0.5
    points = torch.rand(64, 2, generator=generator)
    return logits, masks, targets, points


def brute_force_min(cost):
    num_queries, num_targets = cost.shape
    return min(
        sum(float(cost[q, t]) for t, q in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_targets)
    )


@pytest.mark.parametrize("num_views", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal(seed, num_views):
    generator = torch.Generator().manual_seed(seed)
    matcher = HungarianMatcher()
    for num_queries in range(1, 7):
        for num_targets in range(1, min(num_queries, 4) + 1):
            problem = random_problem(generator, num_queries, num_targets, num_views)
            cost = matcher.cost_matrix(*problem)
            query_idx, target_idx = matcher.match(*problem)
            assert query_idx.dtype == target_idx.dtype == torch.long
            assert len(query_idx) == num_targets
            assert sorted(target_idx.tolist()) == list(range(num_targets))
            assert len(set(query_idx.tolist())) == num_targets
            total = float(cost[query_idx, target_idx].sum())
            assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_more_targets_than_queries_matches_every_query():
    generator = torch.Generator().manual_seed(0)
    query_idx, target_idx = HungarianMatcher().match(*random_problem(generator, 2, 4))
    assert sorted(query_idx.tolist()) == [0, 1]
    assert len(set(target_idx.tolist())) == 2


def naive_cost(matcher, logits, pred_values, target_values):
    """One pair's cost from lists of point values, written out pointwise."""
    entity_prob = math.exp(logits[0]) / (math.exp(logits[0]) + math.exp(logits[1]))
    bce, inter, prob_sum = 0.0, 0.0, 0.0
    for x, t in zip(pred_values, target_values, strict=True):
        p = 1 / (1 + math.exp(-x))
        bce -= t * math.log(p) + (1 - t) * math.log(1 - p)
        inter += p * t
        prob_sum += p
    bce /= len(pred_values)
    dice = 1 - (2 * inter + 1) / (prob_sum + sum(target_values) + 1)
    return (
        -matcher.class_weight * entity_prob + matcher.mask_weight * bce + matcher.dice_weight * dice
    )


def test_cost_matches_naive_pointwise_formula():
    generator = torch.Generator().manual_seed(1)
    logits, masks, targets, points = random_problem(generator, 3, 2, num_views=2)
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    cost = matcher.cost_matrix(logits, masks, targets, points)
    for q in range(3):
        for t in range(2):
            pred_values, target_values = [], []
            for v in range(2):  # the same points read in every view, views concatenated
                pred_values += point_sample(masks[q, v][None, None], points[None])[0, 0].tolist()
                target = targets[t, v][None, None].float()
                target_values += point_sample(target, points[None])[0, 0].tolist()
            expected = naive_cost(matcher, logits[q].tolist(), pred_values, target_values)
            assert float(cost[q, t]) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_point_sample_reads_pixel_centres():
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float).reshape(2, 3, 4, 5)
    rows, cols = torch.tensor([0, 3, 2]), torch.tensor([4, 0, 1])
    points = torch.stack([(cols + 0.5) / 5, (rows + 0.5) / 4], dim=1)  # (x, y)
    values = point_sample(maps, points[None].expand(2, -1, -1))  # [2, 3, 3]
    assert torch.equal(values, maps[:, :, rows, cols])


def two_view_targets(entity_masks):
    """targets[0][v] for one image from per-view lists of masks."""
    return [
        [
            {"masks": torch.stack(view_masks), "ids": torch.arange(len(view_masks))}
            for view_masks in entity_masks
        ]
    ]


def test_batch_level_uses_the_points_of_all_views():
    size = 8
    box = torch.zeros(4 * size, 4 * size, dtype=torch.bool)
    box[:16, :16] = True
    other = torch.zeros_like(box)
    other[16:, 16:] = True
    empty = torch.zeros_like(box)
    # entity 0 in both views; entity 1 only in view 1 (outside the crop of view 0)
    targets = two_view_targets([[box, empty], [box, other]])

    def low(mask):  # mask logits at stride 4 that predict `mask`
        return 20.0 * (mask[::4, ::4].float() * 2 - 1)

    masks = torch.full((1, 2, 3, size, size), -20.0)  # [N, V, Q, h, w]
    masks[0, 0, 0], masks[0, 1, 0] = low(box), low(box)  # query 0: entity 0 in both views
    masks[0, 1, 2] = low(other)  # query 2: entity 1, in view 1; query 1 predicts nothing
    logits = torch.zeros(1, 2, 3, 2)
    logits[..., 1, 0] = 5.0  # query 1 has the best entity score: wins if view 1 is ignored
    matcher = HungarianMatcher(num_points=2000)

    (query_idx, target_idx) = matcher.match_batch_level(logits, masks, targets)[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist(), strict=True)) == {0: 0, 1: 2}

    view0_only = matcher.match(
        logits[0, 0], masks[0, :1].transpose(0, 1), targets[0][0]["masks"][:, None]
    )
    assert dict(zip(view0_only[1].tolist(), view0_only[0].tolist(), strict=True))[1] == 1


def test_image_level_targets_are_the_visible_entities():
    size = 8
    first = torch.zeros(4 * size, 4 * size, dtype=torch.bool)
    first[:8] = True
    second = torch.zeros_like(first)
    second[20:] = True
    empty = torch.zeros_like(first)
    targets = two_view_targets([[first, empty, second], [first, second, empty]])
    logits = torch.zeros(1, 2, 5, 2)
    masks = torch.randn(1, 2, 5, size, size)
    matches = HungarianMatcher(num_points=500).match_image_level(logits, masks, targets)
    assert sorted(matches[0][0][1].tolist()) == [0, 2]  # rows of targets[0][0]["masks"]
    assert sorted(matches[0][1][1].tolist()) == [0, 1]
    assert batch_level_targets(targets[0]).shape == (3, 2, 4 * size, 4 * size)


def test_no_targets_give_empty_indices():
    size = 4
    no_entities = torch.zeros(0, 4 * size, 4 * size, dtype=torch.bool)
    targets = [[{"masks": no_entities, "ids": torch.zeros(0, dtype=torch.long)}] * 2] * 2
    prediction = DecoderOutput(torch.randn(2, 2, 3, 2), torch.randn(2, 2, 3, size, size))
    matcher = HungarianMatcher(num_points=100)
    for per_view in matcher(prediction, targets, level="image"):
        for query_idx, target_idx in per_view:
            assert query_idx.dtype == torch.long and query_idx.numel() == target_idx.numel() == 0
    for query_idx, target_idx in matcher(prediction, targets, level="batch"):
        assert query_idx.dtype == torch.long and query_idx.numel() == target_idx.numel() == 0
    with pytest.raises(ValueError):
        matcher(prediction, targets, level="video")


def test_dense_points_cost_is_the_naive_full_mask_cost():
    """``num_points=None``: the cost reads every pixel centre of the prediction (each target
    pixel value there is the mean of its 2 x 2 full-resolution pixels)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, generator=generator)
    masks = torch.randn(4, 2, 6, 8, generator=generator)  # [Q, V, h, w]
    targets = torch.rand(3, 2, 24, 32, generator=generator) > 0.5  # [M, V, 4h, 4w]
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=None)
    cost = matcher.cost_matrix(logits, masks, targets)
    labels = targets.float().unfold(2, 4, 4).unfold(3, 4, 4)[..., 1:3, 1:3].mean((-1, -2))
    pred = masks.flatten(1)  # [Q, V*h*w]
    labels = labels.flatten(1)  # [M, V*h*w]
    bce = torch.stack(
        [
            torch.stack([F.binary_cross_entropy_with_logits(pred[q], labels[m]) for m in range(3)])
            for q in range(4)
        ]
    )
    probs = pred.sigmoid()
    dice = 1 - (2 * probs @ labels.T + 1) / (probs.sum(1)[:, None] + labels.sum(1)[None] + 1)
    expected = -2.0 * logits.softmax(-1)[:, :1] + 5.0 * bce + 5.0 * dice
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)
