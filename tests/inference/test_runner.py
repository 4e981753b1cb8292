"""Inference settings resolved by the runner."""

import pytest

from entityseg.config import ConfigError
from entityseg.inference.runner import resolve_view_chunk


def test_view_chunk_auto_is_one_view_on_cpu_and_all_on_gpu():
    assert resolve_view_chunk("auto", "cpu") == 1
    assert resolve_view_chunk("auto", "cuda:0") is None
    assert resolve_view_chunk(3, "cuda") == 3
    assert resolve_view_chunk(None, "cpu") is None


@pytest.mark.parametrize("bad", [0, -2, "all", 1.5, True])
def test_a_bad_view_chunk_is_one_clear_line(bad):
    with pytest.raises(ConfigError, match=f"inference.view_chunk={bad!r}: must be auto, null or"):
        resolve_view_chunk(bad, "cpu")
