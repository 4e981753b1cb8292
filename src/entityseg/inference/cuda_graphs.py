"""Inference forward passes replayed from captured CUDA graphs (``inference.cuda_graphs``).

At batch 1 an eager forward launches a few thousand small kernels (Swin blocks, decoder layers),
and on a GPU the host's launch overhead, not the GPU, sets the time: on an H100 the network's
kernels take about a third of an eager forward's wall time. A CUDA graph records the launches
of one forward and replays them with one call. :class:`CudaGraphForward` captures one graph per
input shape (and batch level, view chunk, autocast state) on first use, after warm-up passes on
a side stream, and afterwards copies the input into the graph's static input and replays.

Trade-offs, hence opt-in: every new input shape pays a capture (a few forwards' time) and keeps
its activations' memory while cached (``max_graphs`` shapes, least recently used evicted); the
outputs are the graph's static tensors, overwritten by the next call of the same shape, so use
them (fusion does) before calling again. Inputs of a fixed size (benchmarks, video, a resized
dataset) gain the most. CPU tensors run the network eagerly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from entityseg.models.outputs import CropFormerOutput

#: Eager passes before a capture: they compile Triton kernels, pick cuDNN / cuBLAS algorithms
#: and warm the caching allocator, none of which may happen during the capture.
WARMUP_PASSES = 2


class CudaGraphForward:
    """``net(images, batch_level, view_chunk)`` through cached CUDA graphs, one per input key.

    Args:
        net: the network (a :class:`~entityseg.models.cropformer.CropFormer`), in eval mode.
        max_graphs: graphs kept at once; the least recently used one is freed beyond that.
    """

    def __init__(self, net: nn.Module, max_graphs: int = 4) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} must be >= 1")
        self.net = net
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[
            tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, CropFormerOutput]
        ] = OrderedDict()
        self.captures = 0  # graphs captured so far (evicted ones included)

    def __call__(
        self, images: torch.Tensor, batch_level: bool = True, view_chunk: int | None = None
    ) -> CropFormerOutput:
        if images.device.type != "cuda":
            return self.net(images, batch_level=batch_level, view_chunk=view_chunk)
        if self.net.training:
            raise RuntimeError("CUDA-graph inference needs the network in eval mode")
        key = (
            tuple(images.shape),
            images.dtype,
            images.device,
            batch_level,
            view_chunk,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(),
        )
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(images, batch_level, view_chunk)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_images, outputs = entry
        static_images.copy_(images)
        graph.replay()
        return outputs

    def _capture(
        self, images: torch.Tensor, batch_level: bool, view_chunk: int | None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, CropFormerOutput]:
        static_images = images.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                self.net(static_images, batch_level=batch_level, view_chunk=view_chunk)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.net(static_images, batch_level=batch_level, view_chunk=view_chunk)
        self.captures += 1
        return graph, static_images, outputs


def graphed(net: nn.Module, enabled: bool, device: torch.device) -> nn.Module | CudaGraphForward:
    """``net`` behind a :class:`CudaGraphForward` when ``enabled`` on a CUDA device, else
    ``net`` itself (``inference.cuda_graphs`` has no effect on the CPU). Make it once per run:
    the wrapper's cache is what saves the captures."""
    return CudaGraphForward(net) if enabled and torch.device(device).type == "cuda" else net
