"""Multi-scale deformable attention as one fused Triton kernel, forward and backward.

Computes exactly what :func:`entityseg.models.ms_deform_attn.ms_deform_attn` computes (bilinear
sampling as ``grid_sample(align_corners=False, padding_mode="zeros")``, weights applied, heads
concatenated) without materialising the ``[B*heads, C, Lq, L*P]`` tensor of sampled values that
the reference builds per level: each program reads the four corners of every sampling point for
a block of ``(batch, query, head)`` rows straight from the value map and accumulates in fp32.

The backward pass recomputes the corners, writes the gradients of the locations and weights
(each row owns its points, no atomics) and scatters the value gradient with atomic adds into an
fp32 buffer. The arguments follow Deformable DETR's CUDA op (``spatial_shapes`` and
``level_start_index`` tensors).

The kernel is compiled for CUDA tensors, or run by Triton's CPU interpreter when
``TRITON_INTERPRET=1`` is set when the op is called (the tests' route): the choice is made per
call, not when Triton is imported.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

#: dtypes of ``value`` (the output has the same); locations and weights may be any float dtype.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Largest head dim: the kernel keeps ``BLOCK_ROWS x C`` tiles in registers.
MAX_HEAD_DIM = 256

#: Per pass: elements ``rows x next_pow2(C)`` of one program's tile, and its warps (tuned on
#: an H100 at the release's sizes).
BLOCK_ELEMENTS = {"forward": 2048, "backward": 1024}
NUM_WARPS = {"forward": 8, "backward": 8}

#: ``tl.sum``'s combine function. The kernel calls builtins only: ``tl.sum``, ``tl.zeros`` and
#: the like are jit functions, wrapped for the interpreter or the compiler once, when Triton is
#: imported (and Lightning imports it early), so they would fail in the other mode. It reduces
#: with ``tl.reduce(x, axis, _ADD)`` instead: the interpreter recognises this combine function
#: and sums with numpy; the compiler gets what ``tl.sum`` would give it.
_ADD = tl.standard._sum_combine


def _ms_deform_attn_kernel(
    value_ptr,  # [B, S, heads, C]
    shapes_ptr,  # [L, 2] (H_l, W_l)
    starts_ptr,  # [L] first token of each level in S
    loc_ptr,  # [B, Lq, heads, L, P, 2] normalised (x, y)
    weight_ptr,  # [B, Lq, heads, L, P]
    out_ptr,  # forward: output [B, Lq, heads, C]; backward: grad of it (read)
    grad_value_ptr,  # backward: [B, S, heads, C] fp32, zeroed, atomically accumulated
    grad_loc_ptr,  # backward: [B, Lq, heads, L, P, 2] fp32
    grad_weight_ptr,  # backward: [B, Lq, heads, L, P] fp32
    num_rows,  # B * Lq * heads
    num_tokens,  # S
    num_queries,  # Lq
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # one row = one (batch, query, head): its P points per level and its C output channels
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    row_mask = rows < num_rows
    rows = tl.where(row_mask, rows, 0)
    chans = tl.arange(0, BLOCK_C)  # [Cb]
    tile_mask = row_mask[:, None] & (chans < HEAD_DIM)[None, :]  # [R, Cb]
    batch = rows // (num_queries * NUM_HEADS)
    head = rows % NUM_HEADS
    out_offsets = rows.to(tl.int64)[:, None] * HEAD_DIM + chans[None, :]  # [R, Cb]
    if BACKWARD:
        grad_out = tl.load(out_ptr + out_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.full([BLOCK_ROWS, BLOCK_C], 0.0, tl.float32)  # tl.zeros is a jit function
    step_x = NUM_HEADS * HEAD_DIM  # one pixel to the right in the value map

    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        level_tokens = batch * num_tokens + tl.load(starts_ptr + level).to(tl.int32)  # [R]
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        step_y = width.to(tl.int64) * step_x  # one pixel down
        for point in tl.static_range(NUM_POINTS):
            idx = rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point  # [R]
            x = tl.load(loc_ptr + 2 * idx, mask=row_mask, other=0.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * idx + 1, mask=row_mask, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + idx, mask=row_mask, other=0.0).to(tl.float32)
            # pixel coordinates (centre of pixel i at i) with grid_sample's arithmetic, so that
            # points on pixel centres round to the same cell as the reference
            ix = ((x * 2.0 - 1.0 + 1.0) * width_f - 1.0) * 0.5
            iy = ((y * 2.0 - 1.0 + 1.0) * height_f - 1.0) * 0.5
            # far-out points: all four corners stay outside, and the casts stay in range
            ix = tl.minimum(tl.maximum(ix, -2.0), width_f + 1.0)
            iy = tl.minimum(tl.maximum(iy, -2.0), height_f + 1.0)
            x0f = tl.floor(ix)
            y0f = tl.floor(iy)
            lx = ix - x0f
            ly = iy - y0f
            hx = 1.0 - lx
            hy = 1.0 - ly
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            in_x0 = (x0 >= 0) & (x0 < width)
            in_x1 = (x0 >= -1) & (x0 < width - 1)
            in_y0 = row_mask & (y0 >= 0) & (y0 < height)
            in_y1 = row_mask & (y0 >= -1) & (y0 < height - 1)
            m00 = (in_y0 & in_x0)[:, None] & tile_mask
            m01 = (in_y0 & in_x1)[:, None] & tile_mask
            m10 = (in_y1 & in_x0)[:, None] & tile_mask
            m11 = (in_y1 & in_x1)[:, None] & tile_mask
            token = (level_tokens + y0 * width + x0).to(tl.int64)  # [R] top-left corner
            off00 = ((token * NUM_HEADS + head) * HEAD_DIM)[:, None] + chans[None, :]
            off01 = off00 + step_x
            off10 = off00 + step_y
            off11 = off10 + step_x
            v00 = tl.load(value_ptr + off00, mask=m00, other=0.0).to(tl.float32)  # [R, Cb]
            v01 = tl.load(value_ptr + off01, mask=m01, other=0.0).to(tl.float32)
            v10 = tl.load(value_ptr + off10, mask=m10, other=0.0).to(tl.float32)
            v11 = tl.load(value_ptr + off11, mask=m11, other=0.0).to(tl.float32)
            w00 = hy * hx
            w01 = hy * lx
            w10 = ly * hx
            w11 = ly * lx
            if BACKWARD:
                s00 = tl.reduce(grad_out * v00, 1, _ADD)  # [R] <dL/dout, corner value>
                s01 = tl.reduce(grad_out * v01, 1, _ADD)
                s10 = tl.reduce(grad_out * v10, 1, _ADD)
                s11 = tl.reduce(grad_out * v11, 1, _ADD)
                grad_weight = w00 * s00 + w01 * s01 + w10 * s10 + w11 * s11
                tl.store(grad_weight_ptr + idx, grad_weight, mask=row_mask)
                # d ix / d x = W, d iy / d y = H
                grad_x = weight * width_f * (hy * (s01 - s00) + ly * (s11 - s10))
                grad_y = weight * height_f * (hx * (s10 - s00) + lx * (s11 - s01))
                tl.store(grad_loc_ptr + 2 * idx, grad_x, mask=row_mask)
                tl.store(grad_loc_ptr + 2 * idx + 1, grad_y, mask=row_mask)
                scaled = grad_out * weight[:, None]  # [R, Cb]
                tl.atomic_add(grad_value_ptr + off00, scaled * w00[:, None], mask=m00)
                tl.atomic_add(grad_value_ptr + off01, scaled * w01[:, None], mask=m01)
                tl.atomic_add(grad_value_ptr + off10, scaled * w10[:, None], mask=m10)
                tl.atomic_add(grad_value_ptr + off11, scaled * w11[:, None], mask=m11)
            else:
                sampled = w00[:, None] * v00 + w01[:, None] * v01  # [R, Cb] bilinear value
                sampled += w10[:, None] * v10 + w11[:, None] * v11
                acc += weight[:, None] * sampled

    if not BACKWARD:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@functools.cache
def _kernel(interpret: bool):
    """The kernel compiled for the GPU, or wrapped for Triton's CPU interpreter.

    ``triton.jit`` picks between the two when it decorates; deciding per call instead lets the
    interpreter (tests on CPU) and the compiled kernel (CUDA) live in one process.
    """
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(_ms_deform_attn_kernel)


def _launch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    out: Tensor,
    grads: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """Run the forward pass into ``out``, or with ``grads`` the backward (``out`` = grad)."""
    interpret = bool(triton.knobs.runtime.interpret)
    if not (interpret or value.is_cuda):
        raise RuntimeError(
            "the Triton deformable-attention kernel needs CUDA tensors; on CPU use the torch "
            "reference (impl='torch') or set TRITON_INTERPRET=1 for Triton's interpreter"
        )
    batch, num_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    num_rows = batch * num_queries * num_heads
    block_c = triton.next_power_of_2(head_dim)
    pass_ = "backward" if grads else "forward"
    block_rows = max(1, BLOCK_ELEMENTS[pass_] // block_c)
    grad_value, grad_loc, grad_weight = grads if grads else (out, out, out)  # unused forward
    grid = (triton.cdiv(num_rows, block_rows),)
    _kernel(interpret)[grid](
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        out,
        grad_value,
        grad_loc,
        grad_weight,
        num_rows,
        num_tokens,
        num_queries,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        NUM_LEVELS=num_levels,
        NUM_POINTS=num_points,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        BACKWARD=grads is not None,
        num_warps=NUM_WARPS[pass_],
    )


# Registered as custom ops (``torch.library.custom_op``) with fake (shape-only) versions:
# torch.compile keeps each as one opaque call in its graph, so a compiled pixel decoder is one
# graph instead of breaking at each of its deformable layers. (``triton_op`` would let Inductor
# re-emit the kernel, but its copy of the source loses module globals such as ``_ADD``.)
@custom_op("entityseg::ms_deform_attn_forward", mutates_args=())
def _forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    batch, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    out = value.new_empty(batch, num_queries, num_heads * head_dim)  # [B, Lq, heads*C]
    _launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out)
    return out


@_forward.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, num_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim)


@custom_op("entityseg::ms_deform_attn_backward", mutates_args=())
def _backward(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    f32 = torch.float32
    grad_value = torch.zeros_like(value, dtype=f32)  # atomics accumulate in fp32
    grad_loc = torch.empty_like(sampling_locations, dtype=f32)
    grad_weight = torch.empty_like(attention_weights, dtype=f32)
    grads = (grad_value, grad_loc, grad_weight)
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _launch(*inputs, grad_out.contiguous(), grads)
    return grads


@_backward.register_fake
def _backward_fake(grad_out, value, spatial_shapes, level_start_index, locations, weights):
    f32 = torch.float32
    return (
        torch.empty_like(value, dtype=f32),
        torch.empty_like(locations, dtype=f32),
        torch.empty_like(weights, dtype=f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, grad_out: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, weights = ctx.saved_tensors
    grad_value, grad_loc, grad_weight = _backward(
        grad_out, value, spatial_shapes, level_start_index, sampling_locations, weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value.to(value.dtype) if needs[0] else None,
        None,
        None,
        grad_loc.to(sampling_locations.dtype) if needs[3] else None,
        grad_weight.to(weights.dtype) if needs[4] else None,
    )


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused :func:`~entityseg.models.ms_deform_attn.ms_deform_attn`, differentiable.

    Args:
        value: ``[B, S, heads, C]`` float32 / bfloat16 / float16, levels flattened row-major
            and concatenated; ``C`` at most :data:`MAX_HEAD_DIM`.
        spatial_shapes: ``[L, 2]`` integer ``(H_l, W_l)``; must add up to ``S`` (not checked:
            that would synchronise with the GPU).
        level_start_index: ``[L]`` offset of each level in ``S``.
        sampling_locations: ``[B, Lq, heads, L, P, 2]`` normalised ``(x, y)``.
        attention_weights: ``[B, Lq, heads, L, P]``.

    Returns:
        ``[B, Lq, heads * C]`` in ``value``'s dtype (accumulated in fp32).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, heads, C], got shape {tuple(value.shape)}")
    batch, _, num_heads, head_dim = value.shape
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"value dtype {value.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim C={head_dim} not supported; the kernel takes 1..{MAX_HEAD_DIM}")
    num_levels = spatial_shapes.shape[0]
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != num_heads
        or sampling_locations.shape[3] != num_levels
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must be [B={batch}, Lq, heads={num_heads}, L={num_levels}, P, 2]"
            f", got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if spatial_shapes.shape != (num_levels, 2) or level_start_index.shape != (num_levels,):
        raise ValueError("spatial_shapes must be [L, 2] and level_start_index [L]")
    if not (sampling_locations.is_floating_point() and attention_weights.is_floating_point()):
        raise ValueError("sampling_locations and attention_weights must be floating point")
    device = value.device
    return _forward(
        value.contiguous(),
        spatial_shapes.to(device=device, dtype=torch.int64).contiguous(),
        level_start_index.to(device=device, dtype=torch.int64).contiguous(),
        sampling_locations.to(device).contiguous(),
        attention_weights.to(device).contiguous(),
    )
