"""Shapes, gradient flow and configuration of the deformable pixel decoder (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from entityseg.models.ms_deform_attn import MSDeformAttn
from entityseg.models.pixel_decoder import MSDeformAttnPixelDecoder, encoder_reference_points

CHANNELS = {"res2": 8, "res3": 12, "res4": 20, "res5": 24}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _features(height: int, width: int, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(
            batch,
            CHANNELS[name],
            math.ceil(height / STRIDES[name]),
            math.ceil(width / STRIDES[name]),
            generator=gen,
        )
        for name in CHANNELS
    }


def _decoder(**kwargs) -> MSDeformAttnPixelDecoder:
    torch.manual_seed(0)
    defaults = dict(conv_dim=32, mask_dim=16, num_layers=2, num_heads=4, num_points=2, ffn_dim=48)
    defaults.update(kwargs)
    return MSDeformAttnPixelDecoder(CHANNELS, STRIDES, **defaults)


@pytest.mark.parametrize("image_size", [(64, 96), (72, 100)])
def test_output_shapes(image_size):
    height, width = image_size
    decoder = _decoder()
    mask_features, multi_scale = decoder(_features(height, width))
    assert mask_features.shape == (2, 16, math.ceil(height / 4), math.ceil(width / 4))
    assert [tuple(f.shape) for f in multi_scale] == [
        (2, 32, math.ceil(height / s), math.ceil(width / s)) for s in (32, 16, 8)
    ]


def test_gradients_reach_every_parameter():
    decoder = _decoder()
    # At initialisation the offset and attention-weight matrices are zero, so the output does
    # not depend on the query and level_embed gets an exactly zero gradient; perturb them to
    # check that the graph reaches it.
    with torch.no_grad():
        for layer in decoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.01)
            layer.self_attn.attention_weights.weight.normal_(std=0.01)
    mask_features, multi_scale = decoder(_features(64, 96))
    loss = mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)
    loss.backward()
    missing = [
        name
        for name, p in decoder.named_parameters()
        if p.grad is None or not torch.any(p.grad != 0)
    ]
    assert not missing


def test_encoder_configured_by_arguments():
    decoder = _decoder(num_layers=3, num_heads=2, num_points=3, ffn_dim=40, conv_dim=64)
    assert len(decoder.encoder.layers) == 3
    attention = decoder.encoder.layers[0].self_attn
    assert isinstance(attention, MSDeformAttn)
    assert (attention.dim, attention.num_levels, attention.num_heads, attention.num_points) == (
        64,
        3,
        2,
        3,
    )
    assert decoder.encoder.layers[0].linear1.out_features == 40
    assert decoder.level_embed.shape == (3, 64)


def test_parameter_names_and_level_order():
    decoder = _decoder()
    names = {name for name, _ in decoder.named_parameters()}
    for expected in (
        "input_proj.0.0.weight",
        "input_proj.0.1.weight",
        "level_embed",
        "encoder.layers.1.self_attn.sampling_offsets.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight",
        "encoder.layers.0.norm2.bias",
        "lateral_convs.0.conv.weight",
        "lateral_convs.0.norm.weight",
        "output_convs.0.conv.weight",
        "output_convs.0.norm.bias",
        "mask_features.weight",
        "mask_features.bias",
    ):
        assert expected in names
    # input projections run coarsest first: res5, res4, res3
    assert [proj[0].in_channels for proj in decoder.input_proj] == [24, 20, 12]
    assert decoder.lateral_convs[0].conv.in_channels == CHANNELS["res2"]
    assert decoder.lateral_convs[0].conv.bias is None  # GN convs have no bias


def test_no_norm_option():
    decoder = _decoder(norm="")
    assert decoder.output_convs[0].conv.bias is not None
    assert not any("lateral_convs.0.norm" in n for n, _ in decoder.named_parameters())
    mask_features, _ = decoder(_features(64, 96, batch=1))
    assert mask_features.shape == (1, 16, 16, 24)


def test_reference_points_are_pixel_centres():
    points = encoder_reference_points([(2, 4), (1, 2)], "cpu", torch.float64)
    assert points.shape == (8 + 2, 2, 2)
    torch.testing.assert_close(points[0, 0], torch.tensor([0.125, 0.25], dtype=torch.float64))
    torch.testing.assert_close(points[7, 1], torch.tensor([0.875, 0.75], dtype=torch.float64))
    torch.testing.assert_close(points[9, 0], torch.tensor([0.75, 0.5], dtype=torch.float64))
