"""HorNet (Rao et al., NeurIPS 2022) with global filters, as the CropFormer release builds it.

"HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions". A
ConvNeXt-like network whose blocks mix space with the recursive gated convolution g^n Conv
(:class:`GnConv`); in the ``_gf`` variants the depth-wise convolution of stages 3 and 4 is a
:class:`GlobalLocalFilter` (half the channels: a 3 x 3 depth-wise conv, the other half: a learned
filter multiplied in the 2-D Fourier domain).

Registered with timm as ``hornet_{tiny,small,base,large}_gf``; ``timm.create_model(name,
features_only=True)`` returns the four stage outputs at strides 4-32 (timm's
``FeatureGetterNet`` around :meth:`HorNet.forward_intermediates`, so its state dict is this
model's under ``model.``). Parameter names are those of the release's ``D2HorNet`` backbone
(``downsample_layers.*``, ``stages.*``), except that the release's per-output ``norm0..norm3``
are not part of the model: ``TimmBackbone(out_norm=True)`` has its own ``out_norms``.
The classifier (``norm``, ``head``) is the original HorNet's ImageNet head; ``features_only``
drops it.

The reduced model of the release's test config (``cropformer_hornet_tiny``)::

    timm.create_model("hornet_tiny_gf", base_dim=32, depths=(1, 1, 2, 1),
                      gf_sizes=(None, None, (24, 13), (12, 7)), features_only=True)

Importing this module registers the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["GlobalLocalFilter", "GnConv", "HorNetBlock", "HorNet"]

LN_EPS = 1e-6  # every LayerNorm of HorNet (channels-first and channels-last)
# (h, w) of the global filters of stages 3 and 4; w = h // 2 + 1 (the rfft's half spectrum).
GF_SIZES_224 = (None, None, (14, 8), (7, 4))  # paper / ImageNet 224 (stride 16: 14 x 14)
GF_SIZES_384 = (None, None, (24, 13), (12, 7))  # the release's HorNet-L (HorNet's img384 sizes)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def resize_filter(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The global filter ``[C, h, w, 2]`` (real, imaginary) resized to ``[C, *size, 2]``.

    As the release: ``F.interpolate(weight.permute(3, 0, 1, 2), size, mode="bilinear",
    align_corners=True).permute(1, 2, 3, 0)``, i.e. real and imaginary parts are the batch, the
    C filters the channels; only when the sizes differ (at equal sizes it is the identity).
    """
    if tuple(weight.shape[1:3]) == tuple(size):
        return weight
    resized = F.interpolate(
        weight.permute(3, 0, 1, 2), size=size, mode="bilinear", align_corners=True
    )
    return resized.permute(1, 2, 3, 0)  # [C, size[0], size[1], 2]


class GlobalLocalFilter(nn.Module):
    """The global-local filter that replaces the 7 x 7 depth-wise conv f of g^n Conv.

    ``x [B, C, H, W]`` -> pre_norm -> channels ``[:C/2]``: 3 x 3 depth-wise conv (local);
    channels ``[C/2:]``: ``irfft2(rfft2(x) * K)`` with the learned complex filter
    ``K = complex_weight [C/2, h, w, 2]`` bilinearly resized to the half spectrum
    ``(H, W // 2 + 1)`` (global; ortho-normalised FFTs, computed in float32) -> the two halves
    *interleaved* (output channel 2i is local channel i, 2i + 1 is global channel i) ->
    post_norm. Both norms are channels-first LayerNorms, eps 1e-6.
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"GlobalLocalFilter needs an even channel count, got {dim}")
        half = dim // 2
        self.dw = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.complex_weight = nn.Parameter(torch.empty(half, h, w, 2))
        trunc_normal_(self.complex_weight, std=0.02)
        self.pre_norm = LayerNorm2d(dim, eps=LN_EPS)
        self.post_norm = LayerNorm2d(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]`` (float32 where the input is lower precision)."""
        x = self.pre_norm(x)
        local, spectral = x.chunk(2, dim=1)  # [B, C/2, H, W] each
        local = self.dw(local)
        height, width = spectral.shape[-2:]
        spectrum = torch.fft.rfft2(spectral.float(), dim=(2, 3), norm="ortho")  # [B, C/2, H, W']
        weight = resize_filter(self.complex_weight.float(), spectrum.shape[-2:])
        spectrum = spectrum * torch.view_as_complex(weight.contiguous())
        spectral = torch.fft.irfft2(spectrum, s=(height, width), dim=(2, 3), norm="ortho")
        x = torch.stack((local, spectral), dim=2).flatten(1, 2)  # [B, C, H, W], interleaved
        return self.post_norm(x)


class GnConv(nn.Module):
    """Recursive gated convolution g^n Conv of order n (the paper's Sec. 3.1).

    With ``C_k = C / 2^(n-1-k)`` (``dims = [C_0, ..., C_{n-1} = C]``)::

        [p_0 (C_0), q_0 .. q_{n-1} (sum C_k)] = phi_in(x)          proj_in, 1 x 1, C -> 2C
        f(q) = s * dwconv([q_0 .. q_{n-1}])                         7 x 7 depth-wise or
                                                                    GlobalLocalFilter
        p_1 = p_0 * f_0(q_0);  p_{k+1} = g_k(p_k) * f_k(q_k)        g_k = pws[k-1], 1 x 1
        y = phi_out(p_n)                                            proj_out, 1 x 1

    ``s`` (the release: 1/3) scales the depth-wise output, the paper's 1/alpha.

    Args:
        dim: C.
        order: n.
        gf_size: ``(h, w)`` of a :class:`GlobalLocalFilter` as ``dwconv``; None: 7 x 7 conv.
        scale: s.
    """

    def __init__(
        self, dim: int, order: int = 5, gf_size: tuple[int, int] | None = None, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.order = order
        self.dims = [dim // 2**k for k in reversed(range(order))]  # C_0 .. C_{n-1}
        self.scale = scale
        total = sum(self.dims)
        self.proj_in = nn.Conv2d(dim, self.dims[0] + total, kernel_size=1)
        if gf_size is None:
            self.dwconv = nn.Conv2d(total, total, kernel_size=7, padding=3, groups=total)
        else:
            self.dwconv = GlobalLocalFilter(total, h=gf_size[0], w=gf_size[1])
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)
        self.pws = nn.ModuleList(
            nn.Conv2d(self.dims[k], self.dims[k + 1], kernel_size=1) for k in range(order - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        p, q = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=1)
        gates = (self.dwconv(q) * self.scale).split(self.dims, dim=1)  # f_k(q_k): [B, C_k, H, W]
        p = p * gates[0]
        for pw, gate in zip(self.pws, gates[1:], strict=True):
            p = pw(p) * gate
        return self.proj_out(p)


class HorNetBlock(nn.Module):
    """``x + gamma1 * gnconv(norm1(x))``, then ``x + gamma2 * MLP(norm2(x))`` (4x, GELU).

    ``norm1`` is channels-first on ``[B, C, H, W]``; ``norm2`` and the MLP run channels-last.
    ``gamma1``/``gamma2``: layer scale (absent when ``layer_scale_init_value <= 0``); both
    branches share one DropPath rate (stochastic depth).
    """

    def __init__(
        self,
        dim: int,
        order: int,
        gf_size: tuple[int, int] | None = None,
        scale: float = 1.0 / 3.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=LN_EPS)
        self.gnconv = GnConv(dim, order=order, gf_size=gf_size, scale=scale)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
            self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        y = self.gnconv(self.norm1(x))
        if self.gamma1 is not None:
            y = self.gamma1[:, None, None] * y
        x = x + self.drop_path(y)
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))  # [B,H,W,C]
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class HorNet(nn.Module):
    """HorNet: stem (4 x 4 conv, stride 4) and 3 downsamplings (2 x 2 conv, stride 2), each
    followed by a stage of :class:`HorNetBlock`; stage i has ``base_dim * 2**i`` channels.

    ``downsample_layers[0] = [Conv 4x4/4, LN]``, ``downsample_layers[i>0] = [LN, Conv 2x2/2]``
    (channels-first LayerNorms, eps 1e-6). ``stages[i]`` outputs are the features at strides
    4, 8, 16, 32 (timm ``feature_info``: ``stages.0`` .. ``stages.3``), without any norm.

    Args:
        depths: blocks per stage (HorNet-T/S/B/L: 2, 3, 18, 2).
        base_dim: channels of stage 1 (T/S/B/L: 64/96/128/192).
        orders: g^n Conv order n per stage.
        scale: s of every g^n Conv.
        gf_sizes: per stage, ``(h, w)`` of the global filter, or None for a 7 x 7 depth-wise conv.
        drop_path_rate: stochastic depth, linear from 0 over all blocks to this rate.
        layer_scale_init_value: initial gamma1/gamma2 (<= 0: no layer scale).
        in_chans: input channels.
        num_classes: ImageNet head (0: none); pooling -> LayerNorm -> Linear, as HorNet.
        global_pool: only ``"avg"``.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 3, 18, 2),
        base_dim: int = 64,
        orders: Sequence[int] = (2, 3, 4, 5),
        scale: float = 1.0 / 3.0,
        gf_sizes: Sequence[Sequence[int] | None] = GF_SIZES_224,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not len(depths) == len(orders) == len(gf_sizes) == 4:
            raise ValueError(
                f"HorNet has 4 stages: got depths={depths}, orders={orders}, gf_sizes={gf_sizes}"
            )
        if global_pool != "avg":
            raise ValueError(f"HorNet pools by averaging only, got global_pool={global_pool!r}")
        dims = [base_dim * 2**i for i in range(4)]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0], LN_EPS))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i], LN_EPS), nn.Conv2d(dims[i], dims[i + 1], 2, 2))
            )

        # on the CPU also under a meta default device (TimmBackbone probes on meta)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            gf_size = None if gf_sizes[i] is None else (int(gf_sizes[i][0]), int(gf_sizes[i][1]))
            first = sum(depths[:i])
            blocks = [
                HorNetBlock(
                    dims[i],
                    order=orders[i],
                    gf_size=gf_size,
                    scale=scale,
                    drop_path=rates[first + j],
                    layer_scale_init_value=layer_scale_init_value,
                )
                for j in range(depths[i])
            ]
            self.stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}")
            )

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"HorNet pools by averaging only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages[i], x)
        return self.stages[i](x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """``x [B, 3, H, W]`` -> the outputs of stages ``indices`` (``[B, C_i, H/s_i, W/s_i]``).

        ``norm`` has no effect: HorNet's final norm acts on pooled features only. With
        ``intermediates_only=False`` also returns the last stage's output (the head's input).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"HorNet features are NCHW, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early else len(self.stages) - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head): for ``features_only``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        del self.downsample_layers[max_index + 1 :]
        del self.stages[max_index + 1 :]
        if prune_norm or prune_head or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` -> the last stage's output ``[B, 8 * base_dim, H/32, W/32]``."""
        for i in range(len(self.stages)):
            x = self._stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((-2, -1)))  # global average pooling, [B, C]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """The original HorNet's init (the CropFormer release loads pretrained weights instead)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Registered configurations
# ---------------------------------------------------------------------------------------------


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        **kwargs,
    }


# No weights are registered: load the release's / HorNet's files through ``checkpoint_path``.
default_cfgs = {
    "hornet_tiny_gf": _cfg(),
    "hornet_small_gf": _cfg(),
    "hornet_base_gf": _cfg(),
    "hornet_large_gf": _cfg(input_size=(3, 384, 384), pool_size=(12, 12)),
}


def _create_hornet(variant: str, pretrained: bool = False, **kwargs) -> HorNet:
    if pretrained:
        raise ValueError(
            f"{variant}: timm has no weights for HorNet; give a local file as checkpoint_path"
        )
    return build_model_with_cfg(
        HorNet,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _hornet_gf(variant: str, pretrained: bool, base_dim: int, gf_sizes, kwargs: dict) -> HorNet:
    """HorNet GF: the paper's depths, orders 2-5, s = 1/3; ``kwargs`` override any of them."""
    args = dict(depths=(2, 3, 18, 2), base_dim=base_dim, orders=(2, 3, 4, 5), scale=1.0 / 3.0)
    return _create_hornet(variant, pretrained, **{**args, "gf_sizes": gf_sizes, **kwargs})


@register_model
def hornet_tiny_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-T GF: base 64, global filters (14, 8) / (7, 4) for 224 inputs."""
    return _hornet_gf("hornet_tiny_gf", pretrained, 64, GF_SIZES_224, kwargs)


@register_model
def hornet_small_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-S GF: base 96, global filters (14, 8) / (7, 4) for 224 inputs."""
    return _hornet_gf("hornet_small_gf", pretrained, 96, GF_SIZES_224, kwargs)


@register_model
def hornet_base_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-B GF: base 128, global filters (14, 8) / (7, 4) for 224 inputs."""
    return _hornet_gf("hornet_base_gf", pretrained, 128, GF_SIZES_224, kwargs)


@register_model
def hornet_large_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """HorNet-L GF as CropFormer uses it: base 192, global filters (24, 13) / (12, 7)."""
    return _hornet_gf("hornet_large_gf", pretrained, 192, GF_SIZES_384, kwargs)
