"""Run a network over test batches and turn its outputs into entities for each mode.

Shared by ``python -m entityseg.evaluate`` (all Table 7 modes, AP^e) and
``python -m entityseg.predict``. The forward time is measured per batch without data loading:
``image_o`` runs the image decoder on the full view only (what a single-scale Mask2Former
costs), the ``batch_*`` modes run the whole network over all views (what CropFormer costs).

``inference.precision`` (:data:`PRECISIONS`): ``fp32``, or ``bf16``: the network runs under
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

from entityseg.config import ConfigError
from entityseg.data.views import SIZE_DIVISIBILITY
from entityseg.inference.fusion import Entities, fuse_entities


@dataclass
class ModeResults:
    """Entities of every image for one mode, and the forward time per image (ms)."""

    entities: dict[int, Entities] = field(default_factory=dict)  # image id -> entities
    forward_ms: list[float] = field(default_factory=list)


#: ``inference.precision`` -> the autocast dtype of the network (None: no autocast, float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    """Raise :class:`ConfigError` on an ``inference.precision`` that is not fp32 or bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(
            "inference.precision", precision, f"is unknown; expected one of {list(PRECISIONS)}"
        )


@contextmanager
def inference_precision(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Run the network in ``precision``: bf16 autocast on ``device``'s type, or float32.

    ``fp32`` turns autocast off, so validation under ``trainer.precision=bf16-mixed`` is float32
    too: inference runs in ``inference.precision``, whatever the training precision.
    """
    check_precision(precision)
    dtype = PRECISIONS[precision]
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        yield


def resolve_view_chunk(view_chunk: int | str | None, device: torch.device | str) -> int | None:
    """``inference.view_chunk`` as ``CropFormer.forward`` takes it, or a :class:`ConfigError`.

    ``auto``: one view at a time on the CPU, where the views' activations dominate the peak
    memory and a bigger batch gains little speed; all views at once on a GPU, where each extra
    pass costs thousands of kernel launches. An integer >= 1 or null (all) is used as given.
    """
    if view_chunk == "auto":
        return 1 if torch.device(device).type == "cpu" else None
    if view_chunk is None or (type(view_chunk) is int and view_chunk >= 1):
        return view_chunk
    raise ConfigError("inference.view_chunk", view_chunk, "must be auto, null or an integer >= 1")


def float_outputs(outputs: dict) -> dict:
    """The final ``logits`` and ``masks`` of both decoders in float32 (bf16 under autocast)."""

    def as_float(prediction: dict | None) -> dict | None:
        if prediction is None:
            return None
        return {k: v.float() if k in ("logits", "masks") else v for k, v in prediction.items()}

    return {key: as_float(prediction) for key, prediction in outputs.items()}


def timed_forward(
    net: nn.Module | Callable[..., dict],
    images: torch.Tensor,
    batch_level: bool,
    view_chunk: int | None = None,
) -> tuple[dict, float]:
    """``net(images)`` and its wall time in ms (synchronised on CUDA)."""
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    outputs = net(images, batch_level=batch_level, view_chunk=view_chunk)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return outputs, (time.perf_counter() - start) * 1000


def fuse_modes(
    outputs: dict,
    batch: dict,
    modes: Sequence[str],
    max_entities: int = 100,
    overlapping: bool = False,
    query_chunk: int = 16,
    views: int | None = None,
    compat: str = "entityseg",
) -> dict[str, list[Entities]]:
    """Entities of every image of a collated batch, per mode, from one forward's outputs.

    ``views`` limits the batch's crop boxes to the first views, when the network saw only those.
    Outputs of any float dtype are fused in float32. ``compat="release"`` reproduces the
    release's scores and order (``inference.fusion``). Each image's entities carry the batch's
    crop boxes of that image (``Entities.crop_boxes``), whichever views the mode fused.
    """
    outputs = float_outputs(outputs)
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
            max_entities=max_entities,
            overlapping=overlapping,
            query_chunk=query_chunk,
            compat=compat,
        )
        for mode in modes
    }
    crops = batch["crop_boxes"][:, 1:].cpu()  # [N, V - 1, 4]
    for per_image in fused.values():
        for entities, boxes in zip(per_image, crops, strict=True):
            entities.crop_boxes = boxes.clone()
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
    net: nn.Module | Callable[..., dict],
    batch: dict,
    modes: Sequence[str],
    device: torch.device,
    max_entities: int = 100,
    overlapping: bool = False,
    query_chunk: int = 16,
    precision: str = "fp32",
    compat: str = "entityseg",
    view_chunk: int | None = None,
) -> tuple[dict[str, list[Entities]], dict[str, float]]:
    """Entities of every image of one collated test batch, per mode, and the forward time (ms)
    per image of each mode: the one inference step of ``evaluate``, ``predict`` and validation.

    Image-O runs the network on the full view alone (the single-scale baseline, as released);
    the batch modes share one forward of all views. ``view_chunk`` must be resolved
    (:func:`resolve_view_chunk`); the other settings are those of :func:`run_modes`.
    """
    passes = []  # (modes, views used, batch decoder)
    if "image_o" in modes:  # the single-scale baseline sees the full view only
        passes.append((["image_o"], 1, False))
    if batch_modes := [m for m in modes if m != "image_o"]:
        passes.append((batch_modes, None, True))
    entities: dict[str, list[Entities]] = {}
    forward_ms: dict[str, float] = {}
    for pass_modes, views, batch_level in passes:
        images = _views_input(batch, views).to(device)
        with inference_precision(device, precision):
            outputs, ms = timed_forward(net, images, batch_level, view_chunk)
        entities.update(
            fuse_modes(
                outputs, batch, pass_modes, max_entities, overlapping, query_chunk, views, compat
            )
        )
        forward_ms.update({mode: ms / images.shape[0] for mode in pass_modes})
    return entities, forward_ms


@torch.inference_mode()
def run_modes(
    net: nn.Module | Callable[..., dict],
    batches: Iterable[dict],
    modes: Sequence[str],
    device: torch.device,
    max_entities: int = 100,
    overlapping: bool = False,
    query_chunk: int = 16,
    description: str = "inference",
    show_progress: bool = True,
    precision: str = "fp32",
    compat: str = "entityseg",
    view_chunk: int | str | None = None,
) -> dict[str, ModeResults]:
    """Entities per mode for every image of ``batches`` (collated test batches).

    ``net``: the network, or its :class:`~entityseg.inference.cuda_graphs.CudaGraphForward`
    (``inference.cuda_graphs``). ``precision``: ``fp32`` or ``bf16``
    (:func:`inference_precision`); ``compat``: see :func:`fuse_modes`; ``view_chunk``: views
    through the backbone at once (``CropFormer``; ``auto``: :func:`resolve_view_chunk`).
    """
    check_precision(precision)
    view_chunk = resolve_view_chunk(view_chunk, device)
    results = {mode: ModeResults() for mode in modes}
    for batch in track(batches, description=description) if show_progress else batches:
        fused, forward_ms = infer_batch(
            net,
            batch,
            modes,
            device,
            max_entities,
            overlapping,
            query_chunk,
            precision,
            compat,
            view_chunk,
        )
        for mode in modes:
            results[mode].forward_ms.extend([forward_ms[mode]] * len(fused[mode]))
            for image_id, entities in zip(batch["image_ids"].tolist(), fused[mode], strict=True):
                results[mode].entities[image_id] = entities
    return results
