"""Any timm model as a multi-scale backbone: ``images [B, 3, H, W]`` -> ``{res2..res5}``.

``resN`` is the feature map at stride ``2**N`` (res2: 4, res3: 8, res4: 16, res5: 32), always
channels-first and always ``[B, C, ceil(H / s), ceil(W / s)]``, which is what the pixel decoder
and the mask features at stride 4 are sized from. Stages are picked from timm's ``feature_info``
by their reduction, so no channel count or stage index is written down per model.

Swin (timm 1.0) needs three things to run at any input size with the original Swin's semantics:

* ``strict_img_size=False``: the patch embedding accepts any size and each block builds its
  shifted-window attention mask for the size it sees (timm's ``dynamic_img_size``).
* ``always_partition=True``: otherwise timm shrinks a stage's window to its feature map at the
  *construction* ``img_size`` and drops the shift there (e.g. no shift in the last stage of a
  224 model); the original Swin, as used by Mask2Former / CropFormer, always shifts odd blocks.
* windows padded *before* the cyclic shift: timm pads a feature map that the window does not
  divide (800 x 1216 gives 200 x 304 at stride 4, window 7), but after rolling it, so the
  shifted-window mask no longer lines up with the wrapped-around rows and columns, and tokens on
  opposite image borders attend to each other. :class:`_WindowPaddedSwinBlock` pads first (zeros
  after ``norm1``, as the original Swin does), so timm's own roll, mask and crop are exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from entityseg.models import hornet  # noqa: F401  (registers hornet_*_gf with timm)

FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_LISTED_KEYS = 20  # keys shown per kind in a checkpoint mismatch error


class _WindowPaddedSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the window padding done before the cyclic shift.

    Once the map is a multiple of the window, timm's ``_attn`` pads nothing and its shift mask
    (built for the map it is given) separates the wrapped-around regions correctly.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]  # x: [B, H, W, C], already normalised by norm1
        # a floor division, not a modulo, and no branch on the pad under torch.export: on
        # dynamic H and W, modulos make its shape reasoning take minutes per block and a branch
        # specialises the graph to the example's sizes
        pad_h = _round_up(height, self.window_size[0]) - height
        pad_w = _round_up(width, self.window_size[1]) - width
        if torch.compiler.is_exporting() or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # [B, H + pad_h, W + pad_w, C]
        return super()._attn(x)[:, :height, :width]


def _round_up(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= ``size`` (exact on symbolic sizes too)."""
    return (size + multiple - 1) // multiple * multiple


class TimmBackbone(nn.Module):
    """A timm model (``features_only``) returning ``{name: [B, C, ceil(H/s), ceil(W/s)]}``.

    Args:
        name: timm model name, e.g. ``swin_large_patch4_window7_224`` or ``resnet50``.
        pretrained: load timm's pretrained weights (may download: only when asked for).
        checkpoint_path: a local state dict (torch or safetensors, possibly under ``state_dict``
            or ``model``) saved from ``timm.create_model(name)`` or its ``features_only`` net;
            the classifier and final norm may be present and are ignored.
        drop_path_rate: stochastic depth, passed to timm (Swin's own default is 0.1).
        out_features: which of res2..res5 to return.
        out_norm: a LayerNorm on each returned map, as the original Swin detection backbone
            (and so Mask2Former / CropFormer) has; new weights, not part of timm checkpoints.
        **timm_kwargs: passed to ``timm.create_model`` (they override the Swin settings above).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | Path | None = None,
        drop_path_rate: float = 0.0,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        out_norm: bool = False,
        out_norm_eps: float = 1e-5,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if pretrained and checkpoint_path:
            raise ValueError(
                f"backbone {name}: give pretrained=True (timm weights, may download) or "
                f"checkpoint_path={checkpoint_path}, not both"
            )
        unknown = [f for f in out_features if f not in FEATURE_STRIDES]
        if unknown:
            raise ValueError(f"unknown backbone features {unknown}; choose from res2..res5")
        self.name = name
        # timm returns its stages shallow to deep: keep the names in that order
        self.out_features = sorted(dict.fromkeys(out_features), key=FEATURE_STRIDES.__getitem__)
        timm_kwargs = {"drop_path_rate": drop_path_rate, **timm_kwargs}

        # Probe on the meta device (no memory, no init, no download) for feature_info and the
        # block types, so the real model is built once, with only the stages needed.
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True, **timm_kwargs)
        indices = _stage_indices(probe, name, [FEATURE_STRIDES[f] for f in self.out_features])
        if any(type(m) is SwinTransformerBlock for m in probe.modules()):
            timm_kwargs = {"strict_img_size": False, "always_partition": True, **timm_kwargs}
        del probe

        self.body = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=indices, **timm_kwargs
        )
        for module in self.body.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = _WindowPaddedSwinBlock
        if checkpoint_path:
            load_timm_checkpoint(self.body, checkpoint_path, name, **timm_kwargs)

        info = self.body.feature_info
        self.channels: dict[str, int] = dict(zip(self.out_features, info.channels(), strict=True))
        self.strides: dict[str, int] = dict(zip(self.out_features, info.reduction(), strict=True))
        # Inputs are zero-padded to this multiple inside forward; at sizes that are already a
        # multiple, every map is exactly H / stride (CNN behaviour).
        self.size_divisibility: int = max(self.strides.values())
        # Swin & co. return [B, H, W, C]; timm records that on the features net.
        self.channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        self.out_norms = nn.ModuleDict(
            {
                f: nn.LayerNorm(c, eps=out_norm_eps) if out_norm else nn.Identity()
                for f, c in self.channels.items()
            }
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images [B, 3, H, W]`` -> ``{res_k: [B, C_k, ceil(H / s_k), ceil(W / s_k)]}``.

        The maps are channels-last in memory (``torch.channels_last``).
        """
        height, width = images.shape[-2:]
        pad_h = (-height) % self.size_divisibility
        pad_w = (-width) % self.size_divisibility
        if pad_h or pad_w:  # zeros, like the data pipeline's padding of normalised images
            images = F.pad(images, (0, pad_w, 0, pad_h))
        outputs = {}
        for name, feature in zip(self.out_features, self.body(images), strict=True):
            if not self.channels_last:
                feature = feature.permute(0, 2, 3, 1)  # [B, h, w, C]: LayerNorm normalises C
            feature = self.out_norms[name](feature).permute(0, 3, 1, 2)  # [B, C, h, w]
            stride = self.strides[name]
            # integer ceil: exact, and a size torch.export can save (math.ceil it cannot)
            size = (-(-height // stride), -(-width // stride))
            if feature.shape[-2] < size[0] or feature.shape[-1] < size[1]:
                raise RuntimeError(
                    f"backbone {self.name}: {name} is {tuple(feature.shape[-2:])} for input "
                    f"{height} x {width}, expected at least {size}"
                )
            # dense channels-last maps: the convolutions, resizes and token views downstream
            # take them without a layout copy (and the crop to `size` is materialised)
            outputs[name] = feature[..., : size[0], : size[1]].contiguous(
                memory_format=torch.channels_last
            )
        return outputs


def _stage_indices(features_net: nn.Module, name: str, strides: Sequence[int]) -> list[int]:
    """feature_info indices with the given reductions (the deepest one where several tie)."""
    reductions = features_net.feature_info.reduction()
    by_stride = {r: i for i, r in enumerate(reductions)}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise ValueError(
            f"timm model {name} has no feature map at stride(s) {missing} "
            f"(its feature_info reductions: {reductions})"
        )
    return [by_stride[s] for s in strides]


def load_timm_checkpoint(
    features_net: nn.Module, path: str | Path, name: str, **timm_kwargs
) -> None:
    """Load a plain-model or features-net state dict into a timm ``features_only`` net.

    ``features_only`` renames modules: FeatureListNet flattens the top level (``layers.0`` ->
    ``layers_0``), FeatureGetterNet nests the model (``model.``). Keys that the plain model has
    but the features net dropped (classifier, final norm) are ignored; every other key must
    match, and every weight of the net must be in the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint for {name} not found: {path}")
    # timm's reader: torch or safetensors, unwraps "state_dict" / "model", strips "module."
    source = timm_load_state_dict(str(path), use_ema=False)
    target = features_net.state_dict()
    with torch.device("meta"):  # the plain model's key names, without memory or download
        plain = timm.create_model(name, pretrained=False, **timm_kwargs).state_dict()
    dropped = {k for k in plain if _features_key(k, target) is None}
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        target_key = _features_key(key, target)
        if target_key is not None:
            loaded[target_key] = value
        elif key not in dropped:
            unexpected.append(key)
    missing = [k for k in target if k not in loaded]
    mismatched = [
        f"{k} {_shape(v)} (model {_shape(target[k])})"
        for k, v in loaded.items()
        if _shape(v) != _shape(target[k])
    ]
    problems = [
        f"{len(keys)} {kind}: {_listing(keys)}"
        for kind, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        summary = "; ".join(problems)
        raise ValueError(f"checkpoint {path} does not fit timm model {name}: {summary}")
    features_net.load_state_dict(loaded)


def _features_key(key: str, features_keys: Mapping[str, object]) -> str | None:
    """The name of a plain-model key in the features net, or None if the net has no such key."""
    candidates = [key, f"model.{key}"]  # as is; FeatureGetterNet
    if key.count(".") > 1:  # FeatureListNet: "layers.0.x" -> "layers_0.x"
        candidates.append(key.replace(".", "_", 1))
    return next((k for k in candidates if k in features_keys), None)


def _shape(value: object) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _listing(keys: list[str]) -> str:
    more = len(keys) - _LISTED_KEYS
    return ", ".join(keys[:_LISTED_KEYS]) + (f", ... and {more} more" if more > 0 else "")
