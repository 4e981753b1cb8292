"""TimmBackbone: res2..res5 at strides 4-32 for every config, any input size, local checkpoints.

Large models are only built on the meta device (shapes without memory or compute).
"""

from __future__ import annotations

import copy
import math
import re
import socket
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformerBlock

from entityseg.models.backbone import TimmBackbone, _WindowPaddedSwinBlock, load_timm_checkpoint

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "backbone"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
CHANNELS = {  # per timm model: what each config must expose
    "resnet10t": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "swin_tiny_patch4_window7_224": (96, 192, 384, 768),
    "swin_large_patch4_window7_224": (192, 384, 768, 1536),
    "swin_large_patch4_window12_384": (192, 384, 768, 1536),
    "hornet_large_gf": (192, 384, 768, 1536),
}
SMALL_CONFIGS = ["tiny", "swin_tiny"]  # real forwards on CPU
# A Swin with the real layout (4 stages, window 7, shifted odd blocks) and few weights.
SMALL_SWIN = dict(
    name="swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)
)
# Not multiples of 7 * 32 (window 7 never divides every stage), nor of 32 for the last one.
SIZES = [(64, 96), (96, 128), (70, 101)]


def load_config(config: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{config}.yaml"))


def expected_shapes(backbone: TimmBackbone, batch: int, height: int, width: int) -> dict:
    return {
        f: (batch, c, math.ceil(height / STRIDES[f]), math.ceil(width / STRIDES[f]))
        for f, c in backbone.channels.items()
    }


def as_plain_key(features_key: str) -> str:
    """FeatureListNet's flattened ``layers_0.x`` is ``layers.0.x`` in the plain model."""
    return re.sub(r"^layers_(\d+)\.", r"layers.\1.", features_key)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_gives_res2_to_res5_on_meta(config):
    cfg = load_config(config)
    assert {"name", "pretrained", "checkpoint_path", "drop_path_rate"} <= cfg.keys()
    with torch.device("meta"):
        backbone = TimmBackbone(**cfg)
        outputs = {hw: backbone(torch.empty(2, 3, *hw)) for hw in [(800, 1216), (70, 101)]}
    assert backbone.strides == STRIDES
    assert tuple(backbone.channels.values()) == CHANNELS[cfg["name"]]
    assert backbone.size_divisibility == 32
    for (height, width), features in outputs.items():
        shapes = {f: tuple(t.shape) for f, t in features.items()}
        assert shapes == expected_shapes(backbone, 2, height, width)
    if cfg.get("out_norm"):
        assert all(isinstance(m, torch.nn.LayerNorm) for m in backbone.out_norms.values())


@pytest.mark.parametrize("config", SMALL_CONFIGS)
def test_small_configs_run_at_sizes_other_than_pretraining(config):
    torch.manual_seed(0)
    backbone = TimmBackbone(**load_config(config)).eval()
    for height, width in SIZES:
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            first, second = backbone(images), backbone(images)
        for name, feature in first.items():
            assert tuple(feature.shape) == expected_shapes(backbone, 2, height, width)[name]
            assert feature.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(feature).all()
            assert torch.equal(feature, second[name]), "eval forward is not deterministic"


def test_out_features_subset_and_errors():
    backbone = TimmBackbone("resnet10t", out_features=("res5", "res3"))
    assert backbone.strides == {"res3": 8, "res5": 32}
    assert backbone.channels == {"res3": 128, "res5": 512}
    shapes = {f: t.shape[1:] for f, t in backbone(torch.randn(1, 3, 64, 64)).items()}
    assert shapes == {"res3": (128, 8, 8), "res5": (512, 2, 2)}
    with pytest.raises(ValueError, match="res6"):
        TimmBackbone("resnet10t", out_features=("res6",))
    with torch.device("meta"), pytest.raises(ValueError, match="vit_tiny_patch16_224.*stride"):
        TimmBackbone("vit_tiny_patch16_224")  # one stride (16) only


def test_drop_path_rate_reaches_timm():
    with torch.device("meta"):
        swin = TimmBackbone(**{**load_config("swin_tiny"), "drop_path_rate": 0.3})
        resnet = TimmBackbone("resnet10t", drop_path_rate=0.1)
        swin_off = TimmBackbone(**{**load_config("swin_tiny"), "drop_path_rate": 0.0})
    rates = [m.drop_prob for m in swin.modules() if type(m).__name__ == "DropPath"]
    assert max(rates) == pytest.approx(0.3)  # linear over the blocks, as in Swin
    assert any(type(m).__name__ == "DropPath" for m in resnet.modules())
    assert not any(type(m).__name__ == "DropPath" for m in swin_off.modules())  # timm default 0.1


def test_swin_blocks_keep_full_shifted_windows_in_every_stage():
    """With always_partition every odd block shifts, also where a stage is <= one window."""
    with torch.device("meta"):
        backbone = TimmBackbone(**load_config("swin_large"))
    blocks = [m for m in backbone.modules() if isinstance(m, SwinTransformerBlock)]
    assert len(blocks) == 2 + 2 + 18 + 2
    assert all(type(b) is _WindowPaddedSwinBlock and b.dynamic_mask for b in blocks)
    assert all(b.window_size == (7, 7) for b in blocks)
    stage4 = backbone.body.layers_3.blocks
    assert [b.shift_size for b in stage4] == [(0, 0), (3, 3)]


def _bottom_to_top_leak(attn, size: int) -> float:
    """How much the bottom two rows' outputs depend on the top three rows' inputs."""
    x = torch.randn(1, size, size, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(attn(x)[0, -2:].sum(), x)
    return grad[0, :3].abs().sum().item()


def test_swin_window_padding_keeps_opposite_borders_apart():
    """A 12 x 12 map in a shifted window-7 block: rows 10-11 and 0-2 are never neighbours.

    timm 1.0 pads after the cyclic shift, so wrapped-around rows share a mask region with the
    bottom rows; our block pads first, like the original Swin. At 14 x 14 (no padding) the two
    are the same computation.
    """
    torch.manual_seed(0)
    block = TimmBackbone(**SMALL_SWIN).body.layers_0.blocks[1].eval()
    assert block.shift_size == (3, 3)
    assert _bottom_to_top_leak(block._attn, 12) < 1e-30  # masked: exp(-100)-sized at most
    timm_attn = SwinTransformerBlock._attn.__get__(block)
    # If this fails, timm pads before shifting now and _WindowPaddedSwinBlock can go.
    assert _bottom_to_top_leak(timm_attn, 12) > 1e-3
    x = torch.randn(2, 14, 14, 16)
    assert torch.equal(block._attn(x), timm_attn(x))


def test_features_equal_plain_timm_where_no_padding_is_needed():
    """At window/stride multiples the wrapper only reorders axes (and deepcopies cleanly)."""
    torch.manual_seed(0)
    swin_kwargs = {k: v for k, v in SMALL_SWIN.items() if k != "name"}
    cases = [  # (TimmBackbone args, the same model in plain timm, an input size)
        (SMALL_SWIN, swin_kwargs | {"strict_img_size": False, "always_partition": True}, 224),
        ({"name": "resnet10t"}, {"out_indices": (1, 2, 3, 4)}, 32),  # index 0: stride 2
    ]
    for args, plain_kwargs, unit in cases:
        backbone = copy.deepcopy(TimmBackbone(**args).eval())
        plain = timm.create_model(args["name"], features_only=True, **plain_kwargs).eval()
        plain.load_state_dict(backbone.body.state_dict())
        images = torch.randn(1, 3, unit, 2 * unit)
        with torch.no_grad():
            ours, reference = backbone(images), plain(images)
        for feature, expected in zip(ours.values(), reference, strict=True):
            if backbone.channels_last:
                expected = expected.permute(0, 3, 1, 2)
            assert torch.equal(feature, expected)


@pytest.mark.parametrize("model", ["resnet10t", "small_swin"])
@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "safetensors"])
def test_checkpoint_of_the_plain_timm_model_loads(model, layout, tmp_path):
    args = SMALL_SWIN if model == "small_swin" else {"name": model}
    kwargs = {k: v for k, v in args.items() if k != "name"}
    torch.manual_seed(1)
    source = timm.create_model(args["name"], **kwargs).state_dict()  # with its classifier
    path = tmp_path / ("weights.safetensors" if layout == "safetensors" else "weights.pth")
    if layout == "safetensors":
        save_file(source, str(path))
    else:
        torch.save(source if layout == "plain" else {layout: source, "epoch": 3}, path)
    torch.manual_seed(2)
    backbone = TimmBackbone(**args, checkpoint_path=str(path))
    loaded = backbone.body.state_dict()
    assert loaded
    for key, value in loaded.items():
        assert torch.equal(value, source[as_plain_key(key)]), key


def test_checkpoint_of_features_nets_loads(tmp_path):
    """Already-renamed keys (FeatureListNet) and FeatureGetterNet's ``model.`` prefix."""
    torch.manual_seed(3)
    saved = timm.create_model("resnet10t", features_only=True).state_dict()
    torch.save(saved, tmp_path / "features.pth")
    backbone = TimmBackbone("resnet10t", checkpoint_path=tmp_path / "features.pth")
    assert all(torch.equal(v, saved[k]) for k, v in backbone.body.state_dict().items())

    vit = timm.create_model("vit_tiny_patch16_224")  # head and final norm are dropped below
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    getter = timm.create_model("vit_tiny_patch16_224", features_only=True)
    load_timm_checkpoint(getter, tmp_path / "vit.pth", "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unexpected keys: head.extra"):
        torch.save(vit.state_dict() | {"head.extra": torch.zeros(1)}, tmp_path / "vit.pth")
        load_timm_checkpoint(getter, tmp_path / "vit.pth", "vit_tiny_patch16_224")
    for key, value in getter.state_dict().items():
        assert torch.equal(value, vit.state_dict()[key.removeprefix("model.")]), key


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "swin.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        TimmBackbone("resnet10t", checkpoint_path=str(path))


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    state = timm.create_model("resnet10t").state_dict()
    del state["layer2.0.conv1.weight"]
    state["layer1.0.conv9.weight"] = torch.zeros(3)
    state["layer3.0.bn1.bias"] = torch.zeros(7)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        TimmBackbone("resnet10t", checkpoint_path=tmp_path / "bad.pth")
    message = str(error.value)
    assert "1 missing keys: layer2.0.conv1.weight" in message
    assert "1 unexpected keys: layer1.0.conv9.weight" in message
    assert "layer3.0.bn1.bias (7,) (model (256,))" in message
    assert "fc.weight" not in message and "resnet10t" in message  # classifier: ignored


def test_pretrained_and_checkpoint_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        TimmBackbone("resnet10t", pretrained=True, checkpoint_path=tmp_path / "w.pth")


class NetworkUsed(RuntimeError):
    pass


def test_nothing_is_downloaded_unless_pretrained(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkUsed("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for helper in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(f"timm.models._builder.{helper}", refuse)
    for config in SMALL_CONFIGS:
        TimmBackbone(**load_config(config))
    with pytest.raises(NetworkUsed):  # the guard does sit on timm's download path
        TimmBackbone("resnet10t", pretrained=True)
