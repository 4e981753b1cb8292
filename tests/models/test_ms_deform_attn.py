"""The deformable-attention op (both forms) against a per-point loop, its gradients, the module."""

from __future__ import annotations

import math

import pytest
import torch

from entityseg.models.ms_deform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(5, 7), (3, 4), (2, 2)]


def _bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of ``image [C, H, W]`` at continuous pixel coords (x, y), pixel centres at +0.5."""
    channels, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # to index space, centre of pixel 0 at 0
    x0, y0 = math.floor(px), math.floor(py)
    result = torch.zeros(channels, dtype=image.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < width and 0 <= yi < height:
                weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
                result = result + weight * image[:, yi, xi]
    return result


def _naive_ms_deform_attn(value, shapes, locations, weights):
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * channels, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(channels, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    image = value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(channels, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc = acc + weights[b, q, m, lvl, p] * _bilinear_zero_padded(image, x, y)
                out[b, q, m * channels : (m + 1) * channels] = acc
    return out


def _random_inputs(shapes, batch=2, queries=4, heads=2, channels=3, points=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, total, heads, channels, generator=gen, dtype=torch.float64)
    # [-0.2, 1.2]: some points fall outside the map and read zero padding
    locations = (
        torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
        * 1.4
        - 0.2
    )
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    return value, torch.tensor(shapes, dtype=torch.long), locations, weights


@pytest.mark.parametrize("with_grad", [False, True], ids=["gather", "grid_sample"])
def test_op_matches_per_point_loop(with_grad):
    value, shapes, locations, weights = _random_inputs(SHAPES)
    assert ((locations < 0) | (locations > 1)).any()
    expected = _naive_ms_deform_attn(value, SHAPES, locations, weights)
    actual = ms_deform_attn(value.requires_grad_(with_grad), shapes, locations, weights).detach()
    assert actual.shape == (2, 4, 2 * 3)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)


def test_op_pixel_centre_reads_that_pixel():
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # one 2x3 level
    shapes = torch.tensor([[2, 3]])
    # centre of pixel (row 1, col 2) is x = 2.5/3, y = 1.5/2
    locations = torch.tensor([2.5 / 3, 1.5 / 2], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.item() == pytest.approx(5.0)


def test_op_rejects_inconsistent_shapes():
    value, _, locations, weights = _random_inputs(SHAPES)
    with pytest.raises(ValueError, match="do not add up"):
        ms_deform_attn(value, torch.tensor([[5, 7], [3, 4], [2, 3]]), locations, weights)


def test_op_gradcheck():
    shapes = [(3, 4), (2, 2)]
    value, spatial, locations, weights = _random_inputs(
        shapes, batch=1, queries=2, heads=2, channels=2, points=2, seed=1
    )
    # random points lie off the pixel-centre lines where bilinear has kinks (almost surely)
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, spatial, loc, w),
        (value, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


def test_both_forms_agree_at_model_sizes():
    """Inference (gather) and training (grid_sample) forms at the pixel decoder's real layout
    (8 heads x 32, 3 levels, 4 points), with points far outside the map and on pixel centres."""
    shapes = [(16, 24), (8, 12), (4, 6)]
    value, spatial, locations, weights = _random_inputs(
        shapes, batch=2, queries=50, heads=8, channels=32, points=4, seed=3
    )
    value, locations, weights = (t.float() for t in (value, locations, weights))
    locations[0, :4] = torch.tensor([-3.0, 7.5])  # wholly outside: reads zeros
    locations[1, :4, :, 0] = torch.tensor([2.5 / 24, 5.5 / 16])  # a pixel centre of level 0
    gathered = ms_deform_attn(value, spatial, locations, weights)
    sampled = ms_deform_attn(value.requires_grad_(), spatial, locations, weights)
    assert sampled.requires_grad and not gathered.requires_grad
    assert gathered.abs().max() > 0.1
    torch.testing.assert_close(gathered, sampled.detach(), atol=1e-5, rtol=0)


def _module_inputs(module: MSDeformAttn, batch=2, queries=5):
    gen = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, queries, module.dim, generator=gen)
    reference = torch.rand(batch, queries, len(SHAPES), 2, generator=gen)
    value = torch.randn(batch, total, module.dim, generator=gen)
    spatial = torch.tensor(SHAPES)
    start = torch.tensor([0, 35, 47])
    return query, reference, value, spatial, start


def test_module_output_shape_and_padding_mask():
    module = MSDeformAttn(dim=16, num_levels=3, num_heads=4, num_points=2)
    query, reference, value, spatial, start = _module_inputs(module)
    out = module(query, reference, value, spatial, start)
    assert out.shape == query.shape
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[:, 40:] = True
    masked = module(query, reference, value, spatial, start, mask)
    value_changed = value.clone()
    value_changed[:, 40:] = 100.0
    torch.testing.assert_close(
        module(query, reference, value_changed, spatial, start, mask), masked
    )


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(dim=30, num_heads=8)


def test_initial_offsets_follow_deformable_detr_grid():
    heads, levels, points = 8, 3, 4
    module = MSDeformAttn(dim=32, num_levels=levels, num_heads=heads, num_points=points)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) == 0
    assert torch.count_nonzero(module.output_proj.bias) == 0
    # head m looks toward angle 2*pi*m/8: the 8 neighbours, counter-clockwise from +x
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
        dtype=torch.float32,
    )
    bias = module.sampling_offsets.bias.view(heads, levels, points, 2)
    for m in range(heads):
        for lvl in range(levels):
            for p in range(points):
                torch.testing.assert_close(
                    bias[m, lvl, p], directions[m] * (p + 1), atol=1e-6, rtol=1e-6
                )


def test_initial_module_samples_the_grid_around_reference():
    """With zero offset weights, the first point of head 0 is one pixel to the right."""
    module = MSDeformAttn(dim=8, num_levels=1, num_heads=1, num_points=1).double()
    with torch.no_grad():
        module.value_proj.weight.copy_(torch.eye(8))
        module.output_proj.weight.copy_(torch.eye(8))
    height, width = 3, 4
    value = torch.randn(1, height * width, 8, dtype=torch.float64)
    query = torch.randn(1, 1, 8, dtype=torch.float64)
    centre = torch.tensor([[[[1.5 / width, 1.5 / height]]]], dtype=torch.float64)  # pixel (1, 1)
    out = module(query, centre, value, torch.tensor([[height, width]]), torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], value[0, 1 * width + 2])  # pixel (1, 2)
