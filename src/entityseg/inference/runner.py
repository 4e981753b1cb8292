"""Run a network over test batches and turn its outputs into entities for each mode.

Shared by ``python -m entityseg.evaluate`` (all Table 7 modes, AP^e) and
``python -m entityseg.predict``. The forward time is measured per batch without data loading:
``image_o`` runs the image decoder on the full view only (what a single-scale Mask2Former
costs), the ``batch_*`` modes run the whole network over all views (what CropFormer costs).

``inference.precision``: ``fp32``, or ``bf16``: the network runs under
``torch.autocast(dtype=torch.bfloat16)`` (:func:`inference_precision`, also used by the
LightningModule's validation) and :func:`fuse_modes` casts its outputs back to float32, so the
fusion is the same code in both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from rich.progress import track
from torch import nn

from entityseg.data.views import SIZE_DIVISIBILITY
from entityseg.inference.fusion import Entities, fuse_entities, views_for_mode
from entityseg.inference.settings import InferenceSettings
from entityseg.models.outputs import CropFormerOutput


@dataclass
class ModeResults:
    """Entities of every image for one mode, and the forward time per image (ms)."""

    entities: dict[int, Entities] = field(default_factory=dict)  # image id -> entities
    forward_ms: list[float] = field(default_factory=list)


@contextmanager
def inference_precision(device: torch.device | str, settings: InferenceSettings) -> Iterator[None]:
    """Run the network in ``settings.precision``: bf16 autocast on ``device``'s type, or
    float32.

    ``fp32`` turns autocast off, so validation under ``trainer.precision=bf16-mixed`` is float32
    too: inference runs in ``inference.precision``, whatever the training precision.
    """
    dtype = settings.autocast_dtype
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        yield


def timed_forward(
    net: nn.Module | Callable[..., CropFormerOutput],
    images: torch.Tensor,
    batch_level: bool,
    view_chunk: int | None = None,
) -> tuple[CropFormerOutput, float]:
    """``net(images)`` and its wall time in ms (synchronised on CUDA)."""
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    outputs = net(images, batch_level=batch_level, view_chunk=view_chunk)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return outputs, (time.perf_counter() - start) * 1000


def fuse_modes(
    outputs: CropFormerOutput,
    batch: dict,
    modes: Sequence[str],
    settings: InferenceSettings,
    views: int | None = None,
) -> dict[str, list[Entities]]:
    """Entities of every image of a collated batch, per mode, from one forward's outputs.

    ``views`` limits the batch's crop boxes to the first views, when the network saw only those.
    Outputs of any float dtype are fused in float32, as ``settings`` say
    (:func:`~entityseg.inference.fusion.fuse_entities`). Each image's entities carry the boxes
    of the crops their mode fused (``Entities.crop_boxes``: none for ``image_o`` and
    ``batch_o``, which see the full view alone).
    """
    outputs = outputs.float()  # float32 logits and masks (bf16 under autocast)
    image_sizes = batch["image_sizes"]
    if image_sizes.dim() == 3:  # a valid size per view
        image_sizes = image_sizes[:, :views]
    fused = {
        mode: fuse_entities(
            outputs,
            batch["crop_boxes"][:, :views],
            image_sizes,
            batch["orig_sizes"],
            mode,
            settings,
        )
        for mode in modes
    }
    boxes = batch["crop_boxes"].cpu()  # [N, V, 4]
    for mode, per_image in fused.items():
        # the crops this mode fused: none for image_o and batch_o, which see I^O alone
        crops = [v for v in views_for_mode(mode, boxes.shape[1]) if v > 0]
        for entities, image_boxes in zip(per_image, boxes, strict=True):
            entities.crop_boxes = image_boxes[crops].clone()  # [k, 4]
    return fused


def _views_input(batch: dict, views: int | None) -> torch.Tensor:
    """The network input of the first ``views`` views of a batch.

    When the views differ in size (``image_sizes`` [N, V, 2]) and only the full view is used,
    the padding that the larger crop views needed is cut off: the full view alone is padded to
    a multiple of ``SIZE_DIVISIBILITY`` only, as the release's single-view inference is.
    """
    images = batch["images"][:, :views]
    sizes = batch["image_sizes"]
    if views == 1 and sizes.dim() == 3:
        height, width = (
            -(-int(s) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in sizes[:, 0].amax(0)
        )
        images = images[..., :height, :width]
    return images


def infer_batch(
    net: nn.Module | Callable[..., CropFormerOutput],
    batch: dict,
    modes: Sequence[str],
    device: torch.device,
    settings: InferenceSettings,
) -> tuple[dict[str, list[Entities]], dict[str, float]]:
    """Entities of every image of one collated test batch, per mode, and the forward time (ms)
    per image of each mode: the one inference step of ``evaluate``, ``predict`` and validation.

    Image-O runs the network on the full view alone (the single-scale baseline, as released);
    the batch modes share one forward of all views. ``settings``: precision, views at once
    and the fusion's settings.
    """
    view_chunk = settings.views_at_once(device)
    passes = []  # (modes, views used, batch decoder)
    if "image_o" in modes:  # the single-scale baseline sees the full view only
        passes.append((["image_o"], 1, False))
    if batch_modes := [m for m in modes if m != "image_o"]:
        passes.append((batch_modes, None, True))
    entities: dict[str, list[Entities]] = {}
    forward_ms: dict[str, float] = {}
    for pass_modes, views, batch_level in passes:
        images = _views_input(batch, views).to(device)
        with inference_precision(device, settings):
            outputs, ms = timed_forward(net, images, batch_level, view_chunk)
        entities.update(fuse_modes(outputs, batch, pass_modes, settings, views))
        forward_ms.update({mode: ms / images.shape[0] for mode in pass_modes})
    return entities, forward_ms


@torch.inference_mode()
def run_modes(
    net: nn.Module | Callable[..., CropFormerOutput],
    batches: Iterable[dict],
    modes: Sequence[str],
    device: torch.device,
    settings: InferenceSettings,
    description: str = "inference",
    show_progress: bool = True,
) -> dict[str, ModeResults]:
    """Entities per mode for every image of ``batches`` (collated test batches).

    ``net``: the network, or its :class:`~entityseg.inference.cuda_graphs.CudaGraphForward`
    (``inference.cuda_graphs``); ``settings``: as :func:`infer_batch` takes them.
    """
    results = {mode: ModeResults() for mode in modes}
    for batch in track(batches, description=description) if show_progress else batches:
        fused, forward_ms = infer_batch(net, batch, modes, device, settings)
        for mode in modes:
            results[mode].forward_ms.extend([forward_ms[mode]] * len(fused[mode]))
            for image_id, entities in zip(batch["image_ids"].tolist(), fused[mode], strict=True):
                results[mode].entities[image_id] = entities
    return results
