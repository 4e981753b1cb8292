"""AdamW parameter groups: the release's rules (its ``build_optimizer``), on a tiny CropFormer.

The release-equivalence of every group is proven on the reference models in
``tests/interop/test_release_training.py``; these are the rules one by one.
"""

import pytest
from torch import nn

from conftest import tiny_model
from entityseg.lit_module import parameter_groups


def settings(net, **options) -> dict[str, tuple[float, float]]:
    groups = parameter_groups(net, 1e-4, 0.05, 0.1, **options)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in net.named_parameters()}


def test_norms_and_embeddings_are_not_decayed_everything_else_is():
    net = tiny_model()
    found = settings(net)
    norm_params = {
        f"{m}.{p}" if m else p
        for m, module in net.named_modules()
        if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d)
        for p, _ in module.named_parameters(recurse=False)
    }
    assert norm_params and all(found[n][1] == 0.0 for n in norm_params)
    assert found["image_decoder.query_feat.weight"][1] == 0.0  # nn.Embedding
    assert found["image_decoder.level_embed.weight"][1] == 0.0  # nn.Embedding
    assert found["pixel_decoder.level_embed"] == (1e-4, 0.05)  # a plain parameter: decayed
    biases = [n for n in found if n.endswith(".bias") and n not in norm_params]
    assert biases and all(found[n][1] == 0.05 for n in biases)


def test_backbone_lr_factor_and_decayed_norms():
    net = tiny_model()
    found = settings(net, decayed_norms=("backbone",))
    backbone = [n for n in found if n.startswith("backbone.")]
    assert backbone and all(found[n] == (pytest.approx(1e-5), 0.05) for n in backbone)
    head_norm = "image_decoder.heads.decoder_norm.weight"
    assert found[head_norm] == (1e-4, 0.0)  # outside the prefix: still a norm
    assert settings(net, norm_weight_decay=0.01)[head_norm] == (1e-4, 0.01)
