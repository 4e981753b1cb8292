"""The fused Triton deformable-attention op against the PyTorch reference.

On CPU the kernel runs under Triton's interpreter. The op reads ``TRITON_INTERPRET`` when it is
called (not when Triton is imported), so the ``interpret`` fixture sets it per test with
monkeypatch and the rest of the suite keeps its environment, whatever the import order. The
CUDA test (skipped without a GPU) runs the compiled kernel at the release's sizes.
"""

from __future__ import annotations

import pytest
import torch

from entityseg.models.ms_deform_attn import MSDeformAttn, ms_deform_attn
from entityseg.models.pixel_decoder import MSDeformAttnPixelDecoder

pytest.importorskip("triton")
from entityseg.models.ops.ms_deform_attn_triton import ms_deform_attn_triton  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _level_index(shapes: list[tuple[int, int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes [L, 2]`` and ``level_start_index [L]`` as the kernels take them."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    starts = torch.cat((spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]))
    return spatial, starts


def _inputs(shapes, batch, queries, heads, channels, points, seed=0, device="cpu"):
    """value [B, S, heads, C], locations [B, Lq, heads, L, P, 2], weights [B, Lq, heads, L, P].

    Locations spread over [-0.3, 1.3] (some corners in the zero padding); every fifth point is
    moved wholly outside the map, to either side, and one sits exactly on a pixel centre.
    """
    gen = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, total, heads, channels, generator=gen)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.6 - 0.3
    far = torch.tensor([-0.7, 1.9, -40.0, 35.0])
    flat = locations.view(-1, 2)
    flat[::5, 0] = far[torch.randint(0, 4, (flat[::5].shape[0],), generator=gen)]
    flat[1::7, 1] = far[torch.randint(0, 4, (flat[1::7].shape[0],), generator=gen)]
    height, width = shapes[0]
    locations[0, 0, 0, 0, 0] = torch.tensor([1.5 / width, 0.5 / height])  # a pixel centre
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen)
    return [t.to(device) for t in (value, locations, weights)]


NAMES = ("out", "grad value", "grad locations", "grad weights")


def _max_diffs(actual, expected) -> list[float]:
    pairs = zip(actual, expected, strict=True)
    return [(a.float() - e.float()).abs().max().item() for a, e in pairs]


def _run_both(value, shapes, locations, weights, dtype=None):
    """Output and grads (value, locations, weights) of the kernel and of the fp32 reference.

    With ``dtype`` the kernel gets the inputs in it and the reference their rounded values in
    fp32.
    """
    spatial, starts = _level_index(shapes, value.device)
    if dtype is not None:
        value, locations, weights = (t.to(dtype) for t in (value, locations, weights))
    results = []
    for op, cast in ((ms_deform_attn_triton, None), (ms_deform_attn, torch.float32)):
        leaves = [
            (t if cast is None else t.to(cast)).detach().requires_grad_()
            for t in (value, locations, weights)
        ]
        if op is ms_deform_attn:
            out = op(leaves[0], spatial, leaves[1], leaves[2])
        else:
            out = op(leaves[0], spatial, starts, leaves[1], leaves[2])
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out.to(out.device, out.dtype))
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    return results


CASES = {
    # shapes (H, W) per level, B, Lq, heads, C, P
    "3-levels-1x1": ([(6, 9), (3, 5), (1, 1)], 2, 5, 2, 8, 3),
    "1-level-1-point": ([(4, 7)], 1, 6, 1, 16, 1),
    "non-square-C32": ([(2, 9), (7, 3)], 2, 3, 2, 32, 2),
    "C64": ([(3, 4), (2, 2)], 1, 3, 1, 64, 2),
    "C3-padded": ([(5, 2), (1, 3)], 2, 4, 3, 3, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(interpret, case):
    shapes, batch, queries, heads, channels, points = CASES[case]
    value, locations, weights = _inputs(shapes, batch, queries, heads, channels, points)
    kernel, reference = _run_both(value, shapes, locations, weights)
    assert kernel[0].shape == (batch, queries, heads * channels)
    for name, actual, expected in zip(NAMES, kernel, reference, strict=True):
        assert actual.dtype == torch.float32, name
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_points_wholly_outside_read_zero_and_get_no_grad(interpret):
    shapes = [(3, 4), (2, 2)]
    value, _, weights = _inputs(shapes, 1, 2, 2, 4, 2)
    locations = torch.tensor([-0.6, 1.6]).repeat(1, 2, 2, 2, 2, 1)  # [1, 2, 2, 2, 2, 2]
    kernel, reference = _run_both(value, shapes, locations, weights)
    for actual in kernel:
        assert actual.abs().max() == 0
    for expected in reference:
        assert expected.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_reference(interpret, dtype):
    shapes, batch, queries, heads, channels, points = CASES["3-levels-1x1"]
    value, locations, weights = _inputs(shapes, batch, queries, heads, channels, points)
    kernel, reference = _run_both(value, shapes, locations, weights, dtype=dtype)
    for name, actual, expected in zip(NAMES, kernel, reference, strict=True):
        assert actual.dtype == dtype, name
        # fp32 accumulation: only the output / grad rounding to dtype remains
        tolerance = 1e-2 * expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected, atol=tolerance, rtol=1e-2, msg=name)


def test_rejects_unsupported_inputs(interpret):
    shapes = [(2, 2)]
    spatial, starts = _level_index(shapes)
    value, locations, weights = _inputs(shapes, 1, 2, 1, 4, 1)
    with pytest.raises(ValueError, match="head dim"):
        ms_deform_attn_triton(value.new_zeros(1, 4, 1, 512), spatial, starts, locations, weights)
    with pytest.raises(ValueError, match="dtype"):
        ms_deform_attn_triton(value.double(), spatial, starts, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, spatial, starts, locations, weights[..., :0])


def test_kernel_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = MSDeformAttn(dim=8, num_levels=1, num_heads=2, num_points=1, impl="triton")
    query, reference, value, spatial, starts = _module_inputs(module, [(2, 3)])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        module(query, reference, value, spatial, starts)


def test_bad_impl_name_errors():
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(dim=8, num_heads=2, impl="cuda")


def _module_inputs(module: MSDeformAttn, shapes, batch=2, queries=4):
    gen = torch.Generator().manual_seed(0)
    total = sum(h * w for h, w in shapes)
    query = torch.randn(batch, queries, module.dim, generator=gen)
    reference = torch.rand(batch, queries, len(shapes), 2, generator=gen)
    value = torch.randn(batch, total, module.dim, generator=gen)
    return query, reference, value, *_level_index(shapes)


def _module_pair(impl_a: str, impl_b: str) -> tuple[MSDeformAttn, MSDeformAttn]:
    torch.manual_seed(0)
    first = MSDeformAttn(dim=16, num_levels=2, num_heads=2, num_points=2, impl=impl_a)
    second = MSDeformAttn(dim=16, num_levels=2, num_heads=2, num_points=2, impl=impl_b)
    with torch.no_grad():  # off the initial pixel-centre grid, where bilinear has kinks
        first.sampling_offsets.weight.normal_(std=0.3)
        first.attention_weights.weight.normal_(std=0.3)
    second.load_state_dict(first.state_dict())
    return first, second


def test_module_default_is_torch_reference_on_cpu():
    default, torch_impl = _module_pair("auto", "torch")
    inputs = _module_inputs(default, [(3, 5), (2, 2)])
    assert torch.equal(default(*inputs), torch_impl(*inputs))


def test_module_triton_matches_torch_with_grads(interpret):
    triton_impl, torch_impl = _module_pair("triton", "torch")
    inputs = _module_inputs(triton_impl, [(3, 5), (2, 2)])
    outputs = [module(*inputs) for module in (triton_impl, torch_impl)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    for (name, actual), expected in zip(
        triton_impl.named_parameters(), torch_impl.parameters(), strict=True
    ):
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_pixel_decoder_passes_impl_to_every_layer():
    decoder = MSDeformAttnPixelDecoder(
        in_channels={"res2": 8, "res3": 8, "res4": 8, "res5": 8},
        in_strides={"res2": 4, "res3": 8, "res4": 16, "res5": 32},
        conv_dim=32,
        mask_dim=32,
        num_layers=2,
        num_heads=4,
        ffn_dim=32,
        deform_attn_impl="torch",
    )
    assert [layer.self_attn.impl for layer in decoder.encoder.layers] == ["torch", "torch"]


#: The release's encoder at 800 x 1216: strides 8 / 16 / 32, 8 heads of 32, 4 points.
RELEASE_SHAPES = [(100, 152), (50, 76), (25, 38)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_cuda(dtype):
    tokens = sum(h * w for h, w in RELEASE_SHAPES)
    value, locations, weights = _inputs(RELEASE_SHAPES, 2, tokens, 8, 32, 4, device="cuda")
    weights = weights.softmax(-1)  # realistic scale of the weights
    kernel, reference = _run_both(value, RELEASE_SHAPES, locations, weights, dtype=dtype)
    diffs = _max_diffs(kernel, reference)
    scales = [e.abs().max().item() for e in reference]
    print(f"\n{dtype} max abs diff (out, value, loc, weight): {diffs}, ref max abs: {scales}")
    # fp32: atomics and the reference's summation order differ; bf16: the output rounding
    relative = 1e-5 if dtype == torch.float32 else 1e-2
    for name, diff, scale in zip(NAMES, diffs, scales, strict=True):
        assert diff <= relative * scale, name


@needs_cuda
def test_module_auto_uses_kernel_on_cuda():
    auto, torch_impl = _module_pair("auto", "torch")
    auto, torch_impl = auto.cuda(), torch_impl.cuda()
    inputs = [t.cuda() for t in _module_inputs(auto, [(3, 5), (2, 2)])]
    assert auto._use_triton(inputs[2]) and not torch_impl._use_triton(inputs[2])
    torch.testing.assert_close(auto(*inputs), torch_impl(*inputs), atol=1e-5, rtol=1e-5)


def _compiled_matches_eager(device: str, backend: str) -> None:
    """The op is a registered custom op: torch.compile keeps it in one graph (fullgraph: no
    graph break), forward and backward equal eager."""
    torch._dynamo.reset()
    module, _ = _module_pair("triton", "torch")
    module = module.to(device)
    inputs = [t.to(device) for t in _module_inputs(module, [(6, 9), (3, 5)])]
    inputs[0].requires_grad_()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    results = []
    for run in (module, compiled):
        out = run(*inputs)
        (grad_query,) = torch.autograd.grad(out.square().sum(), inputs[0])
        results.append((out, grad_query))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, atol=1e-4, rtol=1e-4)


def test_kernel_compiles_into_one_graph(interpret):
    _compiled_matches_eager("cpu", backend="aot_eager")  # the kernel under the interpreter


@needs_cuda
def test_kernel_compiles_into_one_graph_cuda():
    _compiled_matches_eager("cuda", backend="inductor")
