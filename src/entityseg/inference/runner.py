"""Run a network over test batches and turn its outputs into entities for each mode.

Shared by ``python -m entityseg.evaluate`` (all Table 7 modes, AP^e) and
``python -m entityseg.predict``. The forward time is measured per batch without data loading:
``image_o`` runs the image decoder on the full view only (what a single-scale Mask2Former
costs), the ``batch_*`` modes run the whole network over all views (what CropFormer costs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from rich.progress import track
from torch import nn

from entityseg.inference.fusion import Entities, fuse_entities


@dataclass
class ModeResults:
    """Entities of every image for one mode, and the forward time per image (ms)."""

    entities: dict[int, Entities] = field(default_factory=dict)  # image id -> entities
    forward_ms: list[float] = field(default_factory=list)


def timed_forward(net: nn.Module, images: torch.Tensor, batch_level: bool) -> tuple[dict, float]:
    """``net(images)`` and its wall time in ms (synchronised on CUDA)."""
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    outputs = net(images, batch_level=batch_level)
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
) -> dict[str, list[Entities]]:
    """Entities of every image of a collated batch, per mode, from one forward's outputs.

    ``views`` limits the batch's crop boxes to the first views, when the network saw only those.
    """
    return {
        mode: fuse_entities(
            outputs,
            batch["crop_boxes"][:, :views],
            batch["image_sizes"],
            batch["orig_sizes"],
            mode,
            max_entities=max_entities,
            overlapping=overlapping,
            query_chunk=query_chunk,
        )
        for mode in modes
    }


@torch.inference_mode()
def run_modes(
    net: nn.Module,
    batches: Iterable[dict],
    modes: Sequence[str],
    device: torch.device,
    max_entities: int = 100,
    overlapping: bool = False,
    query_chunk: int = 16,
    description: str = "inference",
    show_progress: bool = True,
) -> dict[str, ModeResults]:
    """Entities per mode for every image of ``batches`` (collated test batches)."""
    results = {mode: ModeResults() for mode in modes}
    passes = []  # (modes, views used, batch decoder)
    if "image_o" in modes:  # the single-scale baseline sees the full view only
        passes.append((["image_o"], 1, False))
    if batch_modes := [m for m in modes if m != "image_o"]:
        passes.append((batch_modes, None, True))
    for batch in track(batches, description=description) if show_progress else batches:
        for pass_modes, views, batch_level in passes:
            images = batch["images"][:, :views].to(device)
            outputs, ms = timed_forward(net, images, batch_level)
            fused_by_mode = fuse_modes(
                outputs, batch, pass_modes, max_entities, overlapping, query_chunk, views
            )
            for mode, fused in fused_by_mode.items():
                results[mode].forward_ms.extend([ms / len(fused)] * len(fused))
                for image_id, entities in zip(batch["image_ids"].tolist(), fused, strict=True):
                    results[mode].entities[image_id] = entities
    return results
