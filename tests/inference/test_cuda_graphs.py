"""CUDA-graph inference: eager on the CPU, replayed graphs equal eager outputs on a GPU."""

import pytest
import torch

from conftest import tiny_model
from entityseg.inference.cuda_graphs import CudaGraphForward, graphed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphed_is_the_network_itself_on_cpu_or_when_off():
    net = tiny_model().eval()
    assert graphed(net, True, torch.device("cpu")) is net
    assert graphed(net, False, torch.device("cuda")) is net
    assert isinstance(graphed(net, True, torch.device("cuda")), CudaGraphForward)


def test_cpu_tensors_run_eagerly():
    net = tiny_model().eval()
    images = torch.randn(1, 2, 3, 64, 96)
    with torch.no_grad():
        out = CudaGraphForward(net)(images)
        expected = net(images)
    torch.testing.assert_close(out.batch.masks, expected.batch.masks)


def test_a_bad_graph_count_is_one_clear_line():
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphForward(tiny_model(), max_graphs=0)


@needs_cuda
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_replayed_graphs_equal_eager_cuda(precision):
    net = tiny_model().eval().cuda()
    forward = CudaGraphForward(net, max_graphs=2)
    shapes = [(1, 3, 3, 64, 96), (1, 1, 3, 96, 64), (1, 3, 3, 64, 96)]
    autocast = torch.autocast("cuda", dtype=precision or torch.float32, enabled=bool(precision))
    with torch.inference_mode(), autocast:
        for step, shape in enumerate(shapes):
            images = torch.randn(shape, device="cuda")  # new values every call
            batch_level = shape[1] > 1
            graphed_out = forward(images, batch_level=batch_level, view_chunk=1)
            key = "batch" if batch_level else "image"
            got = {name: graphed_out[key][name].clone() for name in ("logits", "masks")}
            expected = net(images, batch_level=batch_level, view_chunk=1)[key]
            for name, value in got.items():
                torch.testing.assert_close(value, expected[name], atol=1e-4, rtol=1e-4)
            assert forward.captures == min(step + 1, 2)  # the third call replays the first
    with pytest.raises(RuntimeError, match="eval mode"):
        net.train()
        forward(torch.randn(shapes[0], device="cuda"))
