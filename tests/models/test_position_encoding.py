"""Sine position encodings against the formula, written out element by element."""

from __future__ import annotations

import math

import pytest
import torch

from entityseg.models.position_encoding import sine_position_2d, sine_position_3d

EPS = 1e-6


def _feature(u: float, k: int, num_feats: int) -> float:
    """Channel k of the encoding of normalised position u."""
    d = 10000.0 ** (2 * (k // 2) / num_feats)
    return math.sin(u / d) if k % 2 == 0 else math.cos(u / d)


def _position(i: int, n: int) -> float:
    return (i + 1) / (n + EPS) * 2 * math.pi


def _naive_2d(height, width, num_feats):
    out = torch.zeros(2 * num_feats, height, width, dtype=torch.float64)
    for k in range(num_feats):
        for i in range(height):
            for j in range(width):
                out[k, i, j] = _feature(_position(i, height), k, num_feats)
                out[num_feats + k, i, j] = _feature(_position(j, width), k, num_feats)
    return out


def test_2d_matches_formula():
    actual = sine_position_2d(5, 7, 8, dtype=torch.float64)
    assert actual.shape == (16, 5, 7)
    torch.testing.assert_close(actual, _naive_2d(5, 7, 8), atol=1e-6, rtol=0)


def test_2d_float32_default():
    actual = sine_position_2d(3, 4, 6)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), _naive_2d(3, 4, 6), atol=1e-6, rtol=0)


def test_2d_hand_checked_values():
    pos = sine_position_2d(4, 8, 4, dtype=torch.float64)
    # y channel 0 at row 0: sin(2*pi * 1/4) = 1; channel 1: cos(pi/2) = 0
    assert pos[0, 0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert pos[1, 0, 0].item() == pytest.approx(0.0, abs=1e-5)
    # row 1: sin(pi) = 0; the last row: sin(2*pi) = 0, cos = 1
    assert pos[0, 1, 0].item() == pytest.approx(0.0, abs=1e-5)
    assert pos[1, 3, 0].item() == pytest.approx(1.0, abs=1e-5)
    # x channel 0 (index num_feats) at column 1 of 8: sin(2*pi * 2/8) = 1
    assert pos[4, 0, 1].item() == pytest.approx(1.0, abs=1e-5)
    # channel 2 has frequency 1/10000**(2/4) = 1/100: sin(pi/2 / 100)
    assert pos[2, 0, 0].item() == pytest.approx(math.sin(math.pi / 200), abs=1e-7)
    # y channels do not vary along x
    assert torch.equal(pos[:4, :, 0], pos[:4, :, 5])


def test_3d_matches_formula():
    views, height, width, num_feats = 3, 4, 5, 6
    actual = sine_position_3d(views, height, width, num_feats, dtype=torch.float64)
    assert actual.shape == (views, 2 * num_feats, height, width)
    base = _naive_2d(height, width, num_feats)
    for v in range(views):
        z = torch.tensor(
            [_feature(_position(v, views), k, 2 * num_feats) for k in range(2 * num_feats)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(actual[v], base + z[:, None, None], atol=1e-6, rtol=0)


def test_3d_single_view_hand_value():
    # one view: z = 2*pi, sin(2*pi) = 0 on channel 0, cos(2*pi) = 1 on channel 1
    pos3 = sine_position_3d(1, 4, 8, 4, dtype=torch.float64)
    pos2 = sine_position_2d(4, 8, 4, dtype=torch.float64)
    assert (pos3[0, 0] - pos2[0]).abs().max().item() == pytest.approx(0.0, abs=1e-5)
    assert (pos3[0, 1] - pos2[1]).abs().max().item() == pytest.approx(1.0, abs=1e-5)


def test_odd_num_feats_rejected():
    with pytest.raises(ValueError, match="even"):
        sine_position_2d(2, 2, 5)
