"""Mask2Former's multi-scale deformable-attention pixel decoder.

The backbone's stride-8/16/32 maps (res3..res5) are projected to ``conv_dim`` and refined
jointly by a deformable transformer encoder, so every scale sees context from the others. An
FPN step then brings the stride-4 map (res2) in for detail and produces the per-pixel
embeddings ``mask_features`` that each query's mask embedding is dotted with. The encoder's
outputs (coarsest first) are the memory the masked-attention decoder cycles through.

Parameter names and the release's (``sem_seg_head.pixel_decoder.`` prefix) they correspond to,
with ``n`` the number of FPN levels (1 for res2..res5 with the encoder on res3..res5):

================================================  ========================================
ours                                              release (Mask2Former / CropFormer)
================================================  ========================================
``input_proj.{i}.0`` / ``.1`` (conv / GN),         ``input_proj.{i}.0`` / ``.1``
i = 0 for the coarsest level (res5)
``level_embed``                                    ``transformer.level_embed``
``encoder.layers.{k}.self_attn.*``                 ``transformer.encoder.layers.{k}.self_attn.*``
``encoder.layers.{k}.norm1|linear1|linear2|norm2`` ``transformer.encoder.layers.{k}.<same>``
``lateral_convs.{j}.conv`` / ``.norm``             ``adapter_{n-j}`` / ``adapter_{n-j}.norm``
``output_convs.{j}.conv`` / ``.norm``              ``layer_{n-j}`` / ``layer_{n-j}.norm``
``mask_features``                                  ``mask_features``
================================================  ========================================

``lateral_convs`` / ``output_convs`` are in top-down order (coarsest FPN level first).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entityseg.models.ms_deform_attn import MSDeformAttn
from entityseg.models.position_encoding import sine_position_2d

#: The masked-attention decoder always cycles over this many scales (the release's constant).
NUM_DECODER_SCALES = 3

#: Groups of every GroupNorm, as in detectron2's ``get_norm("GN", c)``.
GN_GROUPS = 32


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"GN"`` -> GroupNorm(32); ``""`` -> no normalisation."""
    if norm == "GN":
        return nn.GroupNorm(GN_GROUPS, channels)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected 'GN' or ''")


class ConvNorm(nn.Module):
    """Conv2d, optional norm, optional ReLU (detectron2's ``Conv2d(norm=, activation=)``).

    The conv has a bias only without a norm, as in the release.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm: str, relu: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=norm == "",
        )
        self.norm = make_norm(norm, out_channels)
        self.relu = relu
        c2_xavier_fill(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        dropout: float,
        num_levels: int,
        num_heads: int,
        num_points: int,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        # the release xavier-fills every matrix of the encoder (biases keep nn.Linear's default)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """``tokens``/``pos`` ``[B, S, dim]``, ``reference_points`` ``[B, S, L, 2]``;
        ``level_shapes``: ``spatial_shapes`` as Python ints (dynamic sizes under export)."""
        attended = self.self_attn(
            tokens + pos,
            reference_points,
            tokens,
            spatial_shapes,
            level_start_index,
            level_shapes=level_shapes,
        )
        tokens = self.norm1(tokens + self.dropout1(attended))
        hidden = self.dropout2(F.relu(self.linear1(tokens)))
        return self.norm2(tokens + self.dropout3(self.linear2(hidden)))


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device, dtype: torch.dtype
) -> Tensor:
    """``[S, L, 2]``: each token's pixel centre, normalised ``(x, y)``, repeated for all levels.

    With no padding (valid ratio 1) a token's reference point has the same normalised
    coordinates at every level.
    """
    centres = []
    for height, width in spatial_shapes:
        y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        centres.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))  # [H*W, 2]
    points = torch.cat(centres, dim=0)  # [S, 2]
    return points[:, None, :].expand(-1, len(spatial_shapes), -1)


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` over the concatenated tokens of all levels."""

    def __init__(
        self,
        num_layers: int,
        dim: int,
        ffn_dim: int,
        dropout: float,
        num_levels: int,
        num_heads: int,
        num_points: int,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn_dim, dropout, num_levels, num_heads, num_points, impl)
            for _ in range(num_layers)
        )

    def forward(self, tokens: Tensor, pos: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """``tokens``/``pos`` ``[B, S, dim]`` with levels of ``shapes`` concatenated -> same."""
        # filled value by value: no host-to-device copy, which would synchronise with the GPU
        # and cannot be captured in a CUDA graph
        spatial_shapes = torch.empty(len(shapes), 2, dtype=torch.long, device=tokens.device)
        for level, (height, width) in enumerate(shapes):
            spatial_shapes[level, 0].fill_(height)  # a kernel argument, not a tensor copy
            spatial_shapes[level, 1].fill_(width)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        reference_points = encoder_reference_points(shapes, tokens.device, tokens.dtype)
        reference_points = reference_points[None].expand(tokens.shape[0], -1, -1, -1)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference_points, spatial_shapes, level_start_index, shapes)
        return tokens


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder on ``transformer_in_features`` + FPN to ``common_stride``.

    Args:
        in_channels: channels of each backbone feature, keyed ``"res2"``..``"res5"``.
        in_strides: stride of each backbone feature, same keys.
        transformer_in_features: the features refined by the encoder.
        conv_dim: width of the encoder and FPN (a multiple of 32 for GroupNorm).
        mask_dim: channels of ``mask_features``.
        num_layers, num_heads, num_points, ffn_dim, dropout: encoder hyper-parameters.
        norm: ``"GN"`` or ``""`` for the FPN convs (the input projections always use GN).
        common_stride: stride of ``mask_features``.
        deform_attn_impl: ``"auto"``, ``"torch"`` or ``"triton"``: the encoder's deformable
            attention core (see :class:`~entityseg.models.ms_deform_attn.MSDeformAttn`).
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        in_strides: dict[str, int],
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        norm: str = "GN",
        common_stride: int = 4,
        deform_attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        missing = set(transformer_in_features) - set(in_channels)
        if missing or set(in_channels) != set(in_strides):
            raise ValueError("in_channels, in_strides and transformer_in_features disagree")
        # fine to coarse, as the release sorts by stride
        self.in_features = sorted(in_channels, key=lambda name: in_strides[name])
        self.transformer_in_features = sorted(
            transformer_in_features, key=lambda name: in_strides[name]
        )
        num_levels = len(self.transformer_in_features)

        # coarsest (res5) first: the encoder's level order
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels[name], conv_dim, kernel_size=1),
                nn.GroupNorm(GN_GROUPS, conv_dim),
            )
            for name in reversed(self.transformer_in_features)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(
            num_layers,
            conv_dim,
            ffn_dim,
            dropout,
            num_levels,
            num_heads,
            num_points,
            deform_attn_impl,
        )
        self.pos_feats = conv_dim // 2

        # FPN levels between the encoder's finest stride and common_stride (res2 by default)
        finest_stride = min(in_strides[name] for name in self.transformer_in_features)
        num_fpn_levels = round(math.log2(finest_stride) - math.log2(common_stride))
        self.fpn_in_features = self.in_features[:num_fpn_levels][::-1]  # top-down
        self.lateral_convs = nn.ModuleList(
            ConvNorm(in_channels[name], conv_dim, 1, norm, relu=False)
            for name in self.fpn_in_features
        )
        self.output_convs = nn.ModuleList(
            ConvNorm(conv_dim, conv_dim, 3, norm, relu=True) for _ in self.fpn_in_features
        )

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def _encode(self, features: dict[str, Tensor]) -> list[Tensor]:
        """Encoder outputs ``[B, conv_dim, h_l, w_l]`` per level, coarsest first."""
        tokens, pos, shapes = [], [], []
        for level, name in enumerate(reversed(self.transformer_in_features)):
            x = self.input_proj[level](features[name].float())  # [B, C, h, w]
            height, width = x.shape[-2:]
            shapes.append((height, width))
            tokens.append(x.flatten(2).transpose(1, 2))  # [B, h*w, C]
            level_pos = sine_position_2d(height, width, self.pos_feats, x.device, x.dtype)
            pos.append(level_pos.flatten(1).T + self.level_embed[level])  # [h*w, C]
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(pos, 0)[None], shapes)
        maps = memory.split([h * w for h, w in shapes], dim=1)
        return [
            m.transpose(1, 2).reshape(m.shape[0], -1, h, w)
            for m, (h, w) in zip(maps, shapes, strict=True)
        ]

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Backbone features ``{name: [B, C_name, H/s, W/s]}`` -> mask features, memory.

        Returns:
            ``mask_features`` ``[B, mask_dim, H/common_stride, W/common_stride]`` and the
            first ``NUM_DECODER_SCALES`` maps ``[B, conv_dim, h_l, w_l]``, coarsest first (the
            encoder's outputs with the default features). Runs in float32 under AMP, as the
            release does.
        """
        with _autocast_off(next(iter(features.values())).device.type):
            outputs = self._encode(features)
            for name, lateral_conv, output_conv in zip(
                self.fpn_in_features, self.lateral_convs, self.output_convs, strict=True
            ):
                lateral = lateral_conv(features[name].float())
                coarser = F.interpolate(
                    outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
                outputs.append(output_conv(lateral + coarser))
            return self.mask_features(outputs[-1]), outputs[:NUM_DECODER_SCALES]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Float32 region under AMP; devices without autocast (e.g. ``meta``) need nothing."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
