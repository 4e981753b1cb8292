"""HorNet GF: shapes through TimmBackbone, the release's weights by name, and exactness of the
global-local filter, g^n Conv and block against naive re-statements of the release's code."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import entityseg.models.hornet  # noqa: F401  (registers hornet_* with timm)
from entityseg.models.backbone import TimmBackbone
from entityseg.models.hornet import GlobalLocalFilter, GnConv, HorNetBlock

RELEASE = "official_reference/cropformer_hornet_tiny/model_final.pth"
LARGE_KEYS = "official_reference/key_lists/keys_cropformer_hornet_large.json"
# The reduced model of the release's cropformer_hornet_tiny config (MODEL.HORNET.*).
REDUCED = dict(
    name="hornet_tiny_gf",
    base_dim=32,
    depths=(1, 1, 2, 1),
    gf_sizes=(None, None, (24, 13), (12, 7)),
)
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def ours(release_key: str) -> str:
    """A release ``backbone.*`` name in ``TimmBackbone(...).state_dict()``."""
    key = release_key.removeprefix("backbone.")
    norm = re.fullmatch(r"norm(\d)\.(weight|bias)", key)  # per-output norms -> out_norms
    if norm:
        return f"out_norms.res{int(norm[1]) + 2}.{norm[2]}"
    return f"body.model.{key}"  # FeatureGetterNet nests the timm model under "model."


def release_backbone(shared_data) -> dict[str, torch.Tensor]:
    state = torch.load(shared_data / RELEASE, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


# --- (a) shapes, strides, channels ------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 96), (70, 101)])
def test_reduced_model_gives_res2_to_res5(height, width):
    torch.manual_seed(0)
    backbone = TimmBackbone(**REDUCED, out_norm=True).eval()
    assert backbone.channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    assert backbone.strides == STRIDES
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, height, width))
    for name, feature in features.items():
        stride, channels = STRIDES[name], backbone.channels[name]
        size = (math.ceil(height / stride), math.ceil(width / stride))
        assert feature.shape == (2, channels, *size)
        assert torch.isfinite(feature).all()


def test_fewer_outputs_prune_the_later_stages():
    backbone = TimmBackbone(**REDUCED, out_features=("res3", "res4"))
    assert backbone.channels == {"res3": 64, "res4": 128}
    keys = backbone.state_dict()
    assert not any(".stages.3." in k or ".downsample_layers.3." in k or "head" in k for k in keys)


# --- (b) the release's weights ----------------------------------------------------------------


def test_release_backbone_weights_load_by_name(shared_data, tmp_path):
    release = release_backbone(shared_data)
    backbone = TimmBackbone(**REDUCED, out_norm=True)
    mapped = {ours(k): v for k, v in release.items()}
    target = backbone.state_dict()
    assert sorted(mapped) == sorted(target)  # nothing missing, nothing unexpected
    assert all(v.shape == target[k].shape for k, v in mapped.items())
    backbone.load_state_dict(mapped, strict=True)

    # The same file as a plain-model checkpoint (prefix off, output norms out): checkpoint_path.
    plain = {k.removeprefix("backbone."): v for k, v in release.items()}
    plain = {k: v for k, v in plain.items() if not re.match(r"norm\d\.", k)}
    torch.save({"model": plain}, tmp_path / "hornet.pth")
    loaded = TimmBackbone(**REDUCED, checkpoint_path=tmp_path / "hornet.pth").state_dict()
    assert all(torch.equal(loaded[ours(k)], v) for k, v in release.items() if ours(k) in loaded)


def test_full_size_model_has_the_release_names_and_shapes(shared_data):
    keys = json.loads((shared_data / LARGE_KEYS).read_text())["keys"]
    release = {ours(k): tuple(s) for k, s, _ in keys if k.startswith("backbone.")}
    with torch.device("meta"):
        backbone = TimmBackbone(name="hornet_large_gf", drop_path_rate=0.6, out_norm=True)
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == release


# --- (c) exactness against naive re-statements ------------------------------------------------


def naive_layer_norm_cf(x, weight, bias, eps=1e-6):
    """The release's channels-first LayerNorm, spelt out."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(var + eps) + bias[:, None, None]


def naive_bilinear_align_corners(grid, height, width):
    """``grid [..., h, w]`` sampled at ``i * (h - 1) / (height - 1)`` (corners on corners)."""
    h, w = grid.shape[-2:]
    out = grid.new_empty(*grid.shape[:-2], height, width)
    for i in range(height):
        y = i * (h - 1) / (height - 1) if height > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(width):
            x = j * (w - 1) / (width - 1) if width > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = grid[..., y0, x0] * (1 - fx) + grid[..., y0, x1] * fx
            bottom = grid[..., y1, x0] * (1 - fx) + grid[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


def naive_global_local_filter(module: GlobalLocalFilter, x):
    x = naive_layer_norm_cf(x, module.pre_norm.weight, module.pre_norm.bias)
    batch, channels, height, width = x.shape
    half = channels // 2
    out = torch.empty_like(x)
    spectrum_width = width // 2 + 1
    real = naive_bilinear_align_corners(module.complex_weight[..., 0], height, spectrum_width)
    imag = naive_bilinear_align_corners(module.complex_weight[..., 1], height, spectrum_width)
    for c in range(half):
        kernel = module.dw.weight[c : c + 1]  # [1, 1, 3, 3]
        out[:, 2 * c] = F.conv2d(x[:, c : c + 1], kernel, padding=1)[:, 0]
        for b in range(batch):
            spectrum = torch.fft.rfft2(x[b, half + c], norm="ortho")  # [H, W // 2 + 1]
            filtered = spectrum * torch.complex(real[c], imag[c])
            out[b, 2 * c + 1] = torch.fft.irfft2(filtered, s=(height, width), norm="ortho")
    return naive_layer_norm_cf(out, module.post_norm.weight, module.post_norm.bias)


def naive_gnconv(module: GnConv, x, order):
    dim = x.shape[1]
    dims = [dim // 2 ** (order - 1 - k) for k in range(order)]
    fused = F.conv2d(x, module.proj_in.weight, module.proj_in.bias)
    p, q = fused[:, : dims[0]], fused[:, dims[0] :]
    if isinstance(module.dwconv, GlobalLocalFilter):
        f = naive_global_local_filter(module.dwconv, q)
    else:
        f = F.conv2d(q, module.dwconv.weight, module.dwconv.bias, padding=3, groups=q.shape[1])
    f = f * (1 / 3)
    start = 0
    for k in range(order):
        gate = f[:, start : start + dims[k]]
        start += dims[k]
        if k > 0:
            pw = module.pws[k - 1]
            p = F.conv2d(p, pw.weight, pw.bias)
        p = p * gate
    return F.conv2d(p, module.proj_out.weight, module.proj_out.bias)


def randomize_(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (norm weights, layer scales, biases) for the comparisons."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("complex_weight"):
                param.copy_(noise)
            elif param.ndim > 1:  # conv / linear weights: unit gain
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:  # norm weights, biases, layer scales around 1
                param.copy_(1 + 0.5 * noise)


@pytest.mark.parametrize("size", [(24, 24), (5, 7), (9, 30), (1, 1)])
def test_global_local_filter_equals_naive_fft(size):
    torch.manual_seed(0)
    module = GlobalLocalFilter(12, h=24, w=13)
    randomize_(module)
    x = torch.randn(2, 12, *size)
    with torch.no_grad():
        torch.testing.assert_close(
            module(x), naive_global_local_filter(module, x), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(("order", "gf_size"), [(2, None), (3, None), (4, (24, 13)), (5, (12, 7))])
def test_gnconv_equals_naive_recursion(order, gf_size):
    torch.manual_seed(0)
    module = GnConv(32, order=order, gf_size=gf_size, scale=1 / 3)
    randomize_(module)
    x = torch.randn(2, 32, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(module(x), naive_gnconv(module, x, order), atol=1e-5, rtol=1e-5)


def test_block_equals_naive_block():
    torch.manual_seed(0)
    block = HorNetBlock(32, order=4, gf_size=(24, 13), scale=1 / 3)
    randomize_(block)
    x = torch.randn(2, 32, 5, 8)
    with torch.no_grad():
        y = x + block.gamma1[:, None, None] * naive_gnconv(
            block.gnconv, naive_layer_norm_cf(x, block.norm1.weight, block.norm1.bias), 4
        )
        z = F.layer_norm(y.permute(0, 2, 3, 1), (32,), block.norm2.weight, block.norm2.bias, 1e-6)
        z = F.gelu(z @ block.pwconv1.weight.T + block.pwconv1.bias)
        z = (z @ block.pwconv2.weight.T + block.pwconv2.bias) * block.gamma2
        torch.testing.assert_close(block(x), y + z.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


# --- (d) gradients ----------------------------------------------------------------------------


def test_gradients_reach_every_parameter(shared_data):
    backbone = TimmBackbone(**REDUCED, out_norm=True, drop_path_rate=0.2).train()
    backbone.load_state_dict({ours(k): v for k, v in release_backbone(shared_data).items()})
    features = backbone(torch.randn(2, 3, 64, 96))
    sum(f.square().mean() for f in features.values()).backward()
    for name, param in backbone.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
