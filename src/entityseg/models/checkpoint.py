"""Network weights and configuration from a checkpoint.

A training checkpoint (and one converted from the release, ``entityseg.convert_release``) holds
the network's weights under ``state_dict`` (``net.<name>``) and its ``CropFormer`` arguments
under :data:`NET_CONFIG_KEY`, so :func:`build_network` rebuilds the right network from the file
alone; older files or plain state dicts fall back to the ``model.net`` config. The test-time
views are stored too: a training checkpoint's under :data:`VIEWS_KEY` (the ``data`` config's
test keys), a converted one's under :data:`TEST_VIEWS_KEY` (the release config's test settings);
and a training checkpoint's inference settings under :data:`INFERENCE_KEY`.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from entityseg.config import UserError
from entityseg.models.cropformer import CropFormer

log = logging.getLogger(__name__)

#: Attribute under which the LightningModule holds the network: its keys are ``net.<name>``.
LIGHTNING_PREFIX = "net."
#: Checkpoint key of the network's configuration (``CropFormer`` arguments).
NET_CONFIG_KEY = "entityseg_net"
#: Checkpoint key of the release's test-time view settings (converted checkpoints only).
TEST_VIEWS_KEY = "entityseg_release_test_views"
#: Checkpoint key of the test-time views a training run validated with: the ``data`` config's
#: test keys (``entityseg.data.views.ViewConfig.TEST_KEYS``), written by the LightningModule.
VIEWS_KEY = "entityseg_test_views"
#: Checkpoint key of the inference settings a training run validated with
#: (``entityseg.inference.settings.InferenceSettings.to_dict``), written by the LightningModule.
INFERENCE_KEY = "entityseg_inference"


class CheckpointError(UserError):
    """A file that is not a checkpoint entityseg can use, or that does not fit the network."""


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path`` as a dict (a bare state dict comes back as it is); a model
    folder of :mod:`entityseg.models.pretrained` is read as one.

    Read with ``weights_only=True``: tensors, numbers, strings and containers only, which is
    all that a training checkpoint (optimiser, loops, hyper-parameters) or a converted one
    holds. A file that asks the unpickler for anything else (a function, a class: a crafted
    file's way to run code) is refused before any of it runs. Every failure to read is one
    :class:`CheckpointError` line naming the file. Files in torch's zip format are
    memory-mapped: tensors are read when used, so reading a checkpoint for its stored
    configuration (``model.init_from``) and again for its weights does not read a large file
    twice.
    """
    path = Path(path)
    if path.is_dir():  # a model folder (model.safetensors, config.json): no pickle at all
        from entityseg.models.pretrained import read_pretrained  # which imports this module

        return read_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # unpickling garbage fails in many ways: all mean the same
        raise CheckpointError(f"{path}: {_unreadable(err)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(checkpoint).__name__})")
    return checkpoint


def _unreadable(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line."""
    refused = refused_global(err)
    if refused:
        return (
            f"refused to load: it asks the unpickler for {refused}, and a checkpoint "
            "holds only tensors, numbers, strings and containers (nothing in it was run)"
        )
    return f"not a checkpoint (torch.load: {load_error_reason(err)})"


#: What torch's loaders say around their reason: advice (to load unsafely), not the reason.
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def refused_global(err: BaseException) -> str | None:
    """The global (``posix.system``, ``exec``) whose import made ``torch.load(weights_only=
    True)`` refuse a file, or None when it failed otherwise."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    return refused[1] if refused else None


def load_error_reason(err: BaseException) -> str:
    """Why a file did not load, in a few words: the first line of ``err`` that is not torch's
    advice, cut at its first sentence (the error's type when it says nothing)."""
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip() and not line.strip().startswith(_TORCH_ADVICE)
    ]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def stored_net_config(checkpoint: Mapping) -> dict | None:
    """The network configuration saved in a checkpoint, weights-loading settings cleared."""
    config = checkpoint.get(NET_CONFIG_KEY)
    return None if config is None else stored_network(config)


def stored_network(net_config: Mapping[str, Any]) -> dict[str, Any]:
    """A network configuration as a checkpoint or model folder keeps it: its weights are the
    file's, so the backbone's pre-trained weights are never downloaded or read again."""
    network = {k: dict(v) if isinstance(v, Mapping) else v for k, v in net_config.items()}
    network["backbone"].update(pretrained=False, checkpoint_path=None)
    return network


def build_network(
    path: str | Path,
    fallback: Callable[[], nn.Module] | None = None,
    checkpoint: dict | None = None,
) -> nn.Module:
    """The network of checkpoint ``path`` with its weights.

    Built from the configuration stored in the checkpoint when there is one, else by
    ``fallback`` (e.g. instantiating the ``model.net`` config). ``checkpoint``: the file's
    content when already read.
    """
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    stored = stored_net_config(checkpoint)
    if stored is not None:
        log.info("network built from the configuration stored in %s", path)
        net = CropFormer(**stored)
    elif fallback is None:
        raise CheckpointError(f"{path}: stores no network configuration")
    else:
        net = fallback()
    load_weights(net, path, checkpoint)
    return net


def load_weights(
    net: nn.Module,
    path: str | Path,
    checkpoint: dict | None = None,
    allow_fresh_parts: bool = False,
) -> list[str]:
    """Load ``path`` into ``net`` strictly, with one clear error for a wrong file.

    Accepts a Lightning checkpoint (``{"state_dict": {"net.<name>": ...}}``), ``{"model": sd}``,
    ``{"state_dict": sd}`` or a bare state dict of the network. With ``allow_fresh_parts``
    (fine-tuning), whole parts of the network that the file has no tensor of (e.g. the
    association module, from a Mask2Former checkpoint) keep their initialisation; their names
    are returned. Every tensor of a part the file does have must be there, with its shape.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state = checkpoint
    if isinstance(checkpoint, dict):
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state dict in the checkpoint")
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {
            k[len(LIGHTNING_PREFIX) :]: v
            for k, v in state.items()
            if k.startswith(LIGHTNING_PREFIX)
        }
    expected = net.state_dict()
    fresh = sorted(
        {_part(k) for k in expected} - {_part(k) for k in state} if allow_fresh_parts else set()
    )
    problems = [
        *(f"missing {k}" for k in expected if k not in state and _part(k) not in fresh),
        *(f"unexpected {k}" for k in state if k not in expected),
        *(
            f"{k} is {list(state[k].shape)}, expected {list(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ),
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise CheckpointError(f"{path}: does not fit this network: {shown}")
    net.load_state_dict(state, strict=not fresh)
    return fresh


def _part(name: str) -> str:
    """The part of the network a tensor belongs to: ``image_decoder``, ``backbone.body``, ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" else parts[0]


#: Settings that change how a network trains or runs, not its weights: fine-tuning takes them
#: from the training config rather than from the checkpoint it starts from.
_TRAINING_SETTINGS = {
    "backbone": ("drop_path_rate",),
    "pixel_decoder": ("dropout", "deform_attn_impl"),
    "decoder": ("dropout",),
    "association": ("enabled", "share_decoder", "xatt", "satt", "ffn"),
}


def fine_tuning_net_config(configured: Mapping, stored: Mapping) -> dict:
    """The network to fine-tune: the checkpoint's architecture, the config's training settings.

    ``configured``: the ``model.net`` config (resolved); ``stored``: the checkpoint's network
    configuration. A checkpoint without an association module (Mask2Former) leaves the
    configured one, which then starts fresh, as the release starts CropFormer from Mask2Former
    weights.
    """
    net = dict(configured)
    for part, settings in _TRAINING_SETTINGS.items():
        if part == "association" and not stored[part].get("enabled", True):
            continue  # nothing to take: the configured association starts fresh
        own = {k: configured[part][k] for k in settings if k in configured.get(part, {})}
        net[part] = {**stored[part], **own}
    return net
