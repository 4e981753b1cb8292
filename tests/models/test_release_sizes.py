"""Our network has exactly the release's tensor sizes, part by part (from its key lists).

``../shared/data/official_reference/key_lists`` lists every tensor of the released full-size
checkpoints; equal parameter counts per component show the architecture matches (widths, depths,
heads, FFN sizes, norms, biases) before any weight is converted.
"""

import json
import math
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO

CASES = [
    ("keys_cropformer_swin_large_w7.json", ["model/backbone=swin_large"]),
    ("keys_cropformer_swin_tiny.json", ["model/backbone=swin_tiny"]),
    ("keys_mask2former_swin_large_w7.json", ["model=mask2former", "model/backbone=swin_large"]),
]


def release_counts(path) -> Counter:
    counts = Counter()
    for name, shape, dtype in json.loads(path.read_text())["keys"]:
        if dtype != "float32" or name.endswith("empty_weight"):  # buffers, loss weights
            continue
        if "make_3d" in name:
            part = "association"
        elif name.startswith("backbone."):
            part = "backbone"
        elif ".pixel_decoder." in name:
            part = "pixel_decoder"
        else:
            part = "image_decoder"
        counts[part] += math.prod(shape)
    return counts


@pytest.mark.parametrize(("key_list", "overrides"), CASES)
def test_parameter_counts_equal_the_release(shared_data, key_list, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model.net)
    ours = Counter(
        {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    )
    ours = +ours  # drop parts with no parameters (e.g. a missing association)
    assert ours == release_counts(shared_data / "official_reference/key_lists" / key_list)
