"""Multi-scale deformable attention (Deformable DETR), as used by the pixel decoder's encoder.

Each query attends to only ``P`` sampled points per head and per level instead of to every
token: a point's location is the query's reference point plus a learned offset (in pixels of
that level), its value is bilinearly interpolated from the level's value map, and the points'
values are summed with softmax weights learned from the query. This keeps the encoder linear in
the number of tokens, which is what makes attention over strides 8/16/32 affordable.

:func:`ms_deform_attn` is the pure-PyTorch sampling-and-weighting core (the operation a fused
kernel implements, :mod:`entityseg.models.ops.ms_deform_attn_triton` on CUDA);
:class:`MSDeformAttn` adds the learned projections and picks the implementation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_shapes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points, per head.

    Two exact formulations, picked for speed (and for export):

    - without gradients (inference), one gather: bilinear sampling with zero padding
      (``grid_sample``, ``align_corners=False``) and the attention-weighted sum read 4 corner
      tokens per point with weight ``attention * bilinear``, which
      :func:`torch.nn.functional.embedding_bag` does in one fused pass (the query x head is
      the bag, the ``L * P * 4`` corners its entries) without the ``[B*heads, C, Lq, P]``
      samples of the ``grid_sample`` route: on the CPU about 2.5-5x faster at the model's sizes;
    - with gradients (training), ``grid_sample`` per level and a weighted sum: its backward
      scatters directly, where ``embedding_bag``'s sorts every index. On the CPU that made the
      demo's training step 15 % slower; at Swin-T's sizes the sorting form was 15 % faster for
      the pixel decoder, but CPU training is the demo's and the tests' case (GPUs use the
      Triton kernel). Under ``torch.export`` (and so the ONNX export) always this one: ONNX
      has ``GridSample`` (opset >= 16) and no ``embedding_bag``.

    Args:
        value: ``[B, S, heads, C]``, the levels' value maps flattened row-major and concatenated
            in level order (``S = sum_l H_l * W_l``).
        spatial_shapes: ``[L, 2]`` long, ``(H_l, W_l)`` per level.
        sampling_locations: ``[B, Lq, heads, L, P, 2]``, normalised ``(x, y)``: 0 is the left/top
            edge of the first pixel and 1 the right/bottom edge of the last one. Points outside
            ``[0, 1]`` read zeros beyond the border.
        attention_weights: ``[B, Lq, heads, L, P]``.
        level_shapes: ``spatial_shapes`` as Python ``(H_l, W_l)`` pairs, when the caller has
            them: read from the tensor otherwise, which ``torch.export`` cannot do with
            dynamic sizes (a tensor's values are data, not shapes).

    Returns:
        ``[B, Lq, heads * C]``, heads concatenated on the channel axis.
    """
    if level_shapes is None:
        level_shapes = spatial_shapes.tolist()
    shapes = [(h, w) for h, w in level_shapes]
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {shapes} do not add up to {value.shape[1]} value tokens")
    inputs = (value, sampling_locations, attention_weights)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if training or torch.compiler.is_exporting():
        return _grid_sample_form(value, shapes, sampling_locations, attention_weights)
    return _gather_form(value, shapes, sampling_locations, attention_weights)


def _grid_sample_form(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`ms_deform_attn` as ``grid_sample`` per level, summed level by level."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * locations - 1.0  # grid_sample's [-1, 1] with align_corners=False
    # [B, Lq, heads, L, P] -> [B*heads, 1, Lq, L, P]
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels, num_points
    )
    output = None
    for level, (height, width) in enumerate(shapes):
        # [B, H*W, heads, C] -> [B*heads, C, H, W]
        value_map = (
            value_per_level[level]
            .permute(0, 2, 3, 1)
            .reshape(batch * num_heads, head_dim, height, width)
        )
        # [B, Lq, heads, P, 2] -> [B*heads, Lq, P, 2]
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(
            value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B*heads, C, Lq, P]
        level_sum = torch.linalg.vecdot(sampled, weights[..., level, :])  # [B*heads, C, Lq]
        output = level_sum if output is None else output + level_sum
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def _gather_form(
    value: Tensor,
    shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`ms_deform_attn` as one ``embedding_bag`` over a zero-bordered value table.

    Each level gets a one-token zero border and coordinates are clamped into it, so every
    corner index is valid and points outside the map read zeros. Coordinates use
    ``grid_sample``'s arithmetic, so points on a pixel centre round the same way.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    table, level_starts = _zero_bordered_levels(value, shapes)  # [B, S', heads, C]
    device = value.device

    def per_point(values: list[int], dtype: torch.dtype) -> Tensor:  # [L] -> [L*P]
        return torch.tensor(values, dtype=dtype, device=device).repeat_interleave(num_points)

    points = num_levels * num_points
    width = per_point([w for _, w in shapes], sampling_locations.dtype)
    height = per_point([h for h, _ in shapes], sampling_locations.dtype)
    locations = sampling_locations.reshape(batch, num_queries, num_heads, points, 2)
    # pixel coordinates (pixel centres at integers) in grid_sample's arithmetic; -1 and W (H)
    # are the zero border
    grid = locations * 2.0 - 1.0
    x = (((grid[..., 0] + 1.0) * width - 1.0) * 0.5).clamp(-1.0).minimum(width)
    y = (((grid[..., 1] + 1.0) * height - 1.0) * 0.5).clamp(-1.0).minimum(height)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0  # [B, Lq, heads, L*P]

    # row-major index of the top-left corner in the bordered table, then of every corner
    row = per_point([w + 2 for _, w in shapes], torch.int64)
    top_left = torch.addcmul(x0, y0, row.to(x0.dtype)).long() + per_point(level_starts, torch.int64)
    top_left = top_left + row + 1  # the border row above and the border column on the left
    top_left = top_left + torch.arange(batch, device=device).view(-1, 1, 1, 1) * table.shape[1]
    top_left = top_left * num_heads + torch.arange(num_heads, device=device).view(1, 1, -1, 1)
    corners = torch.stack([torch.zeros_like(row), torch.ones_like(row), row, row + 1], -1)
    index = top_left[..., None] + corners * num_heads  # [B, Lq, heads, L*P, 4]
    if table.numel() // head_dim < 2**31:
        index = index.int()

    weights = attention_weights.reshape(batch, num_queries, num_heads, points)
    bottom = fy * weights
    top = weights - bottom
    left = 1 - fx
    corner_weights = torch.stack([left * top, fx * top, left * bottom, fx * bottom], -1)

    bags = batch * num_queries * num_heads
    output = F.embedding_bag(  # one bag per (image, query, head): [B*Lq*heads, C]
        index.view(bags, points * 4),
        table.reshape(-1, head_dim),
        per_sample_weights=corner_weights.view(bags, points * 4).to(table.dtype),
        mode="sum",
    )
    return output.view(batch, num_queries, num_heads * head_dim)


def _zero_bordered_levels(value: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, list[int]]:
    """``value [B, S, heads, C]`` with a zero border around every level, and level starts.

    A zero tail as long as the widest bordered row + 1 follows the last level: corners one row
    below the bottom border can be indexed there (they always carry weight 0).
    """
    batch, _, num_heads, head_dim = value.shape
    parts, starts, start = [], [], 0
    levels = value.split([h * w for h, w in shapes], dim=1)
    for tokens, (height, width) in zip(levels, shapes, strict=True):
        level_map = tokens.view(batch, height, width, num_heads, head_dim)
        parts.append(F.pad(level_map, (0, 0, 0, 0, 1, 1, 1, 1)).flatten(1, 2))
        starts.append(start)
        start += (height + 2) * (width + 2)
    tail = max(width for _, width in shapes) + 3
    parts.append(value.new_zeros(batch, tail, num_heads, head_dim))
    return torch.cat(parts, dim=1), starts


def initial_offset_grid(num_heads: int, num_levels: int, num_points: int) -> Tensor:
    """Deformable DETR's initial sampling offsets ``[heads, L, P, 2]``, in pixels ``(x, y)``.

    Head ``m`` looks in direction ``2*pi*m/heads``, scaled so the larger of ``|x|``, ``|y|`` is
    1 (the 8 neighbours of a pixel for 8 heads); point ``p`` sits ``p + 1`` steps along it. The
    same pattern is used at every level. The spread gives each head a distinct receptive field
    before training.
    """
    angles = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [heads, 2]
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    steps = torch.arange(1, num_points + 1, dtype=torch.float32)  # [P]
    grid = directions[:, None, None, :] * steps[None, None, :, None]  # [heads, 1, P, 2]
    return grid.expand(num_heads, num_levels, num_points, 2).contiguous()


#: Implementations of the sampling core that :class:`MSDeformAttn` can use.
IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_op() -> Callable | None:
    """The fused Triton op, or None where Triton does not import (imported on first use)."""
    try:
        from entityseg.models.ops.ms_deform_attn_triton import ms_deform_attn_triton
    except ImportError:
        return None
    return ms_deform_attn_triton


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with learned offsets, weights and projections.

    Args:
        dim: model width, split evenly over the heads.
        num_levels: number of feature levels ``L`` in the value input.
        num_heads: attention heads ``M``.
        num_points: sampled points ``K`` per head and level.
        impl: the sampling core: ``"torch"`` the PyTorch op :func:`ms_deform_attn`, ``"triton"``
            the fused kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"auto"`` the kernel
            for CUDA tensors when Triton imports, else the PyTorch op.
    """

    def __init__(
        self,
        dim: int = 256,
        num_levels: int = 3,
        num_heads: int = 8,
        num_points: int = 4,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if impl not in IMPLS:
            raise ValueError(f"unknown deformable-attention impl {impl!r}; expected one of {IMPLS}")
        self.impl = impl
        self.dim = dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a fixed grid, weights uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        grid = initial_offset_grid(self.num_heads, self.num_levels, self.num_points)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from each query to ``P`` points per head around its per-level reference.

        Args:
            query: ``[B, Lq, dim]`` (content + position).
            reference_points: ``[B, Lq, L, 2]`` normalised ``(x, y)`` in ``[0, 1]``.
            value_input: ``[B, S, dim]``, all levels flattened and concatenated.
            spatial_shapes: ``[L, 2]`` long ``(H_l, W_l)``.
            level_start_index: ``[L]`` offset of each level in ``S`` (the kernels' argument;
                the PyTorch op derives it from ``spatial_shapes``).
            padding_mask: ``[B, S]`` bool, True on padded tokens (their values are zeroed).
            level_shapes: ``spatial_shapes`` as Python ints, when known (see
                :func:`ms_deform_attn`: what lets ``torch.export`` keep the sizes dynamic).

        Returns:
            ``[B, Lq, dim]``.
        """
        batch, num_queries, _ = query.shape
        num_tokens = value_input.shape[1]
        if reference_points.shape[-1] != 2:
            raise ValueError("reference_points must be [B, Lq, L, 2] points (x, y)")

        value = self.value_proj(value_input)  # [B, S, dim]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, num_tokens, self.num_heads, self.dim // self.num_heads)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        # offsets are in pixels of each level: divide by (W_l, H_l) to normalise
        level_size_xy = spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2]
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / level_size_xy[None, None, None, :, None, :]
        )  # [B, Lq, heads, L, P, 2]
        if self._use_triton(value):
            op = triton_op()
            if op is None:
                raise ImportError("impl='triton' needs the triton package, which does not import")
            output = op(value, spatial_shapes, level_start_index, locations, weights)
        else:  # level_start_index is implied by spatial_shapes for the PyTorch op
            output = ms_deform_attn(value, spatial_shapes, locations, weights, level_shapes)
        return self.output_proj(output)  # [B, Lq, dim]

    def _use_triton(self, value: Tensor) -> bool:
        if self.impl == "auto":
            return value.is_cuda and triton_op() is not None
        return self.impl == "triton"
