"""A model as a folder anyone can open safely: ``model.safetensors``, ``config.json``, a card.

The format of :meth:`~entityseg.api.EntitySegmenter.save_pretrained`,
``python -m entityseg.export format=pretrained``, the Hub (``push_to_hub``) and the converted
release models that :mod:`entityseg.hub` caches:

* ``model.safetensors``: the network's tensors by name (no pickle: reading it runs no code);
* ``config.json``: what rebuilds and runs it (:data:`FORMAT` ``entityseg``, its
  ``format_version``, the entityseg version that wrote it, the network configuration, the
  test views, the fusion's ``compat``, the inference settings it was evaluated with, and
  where it came from);
* ``README.md``: the model card (:mod:`entityseg.hub.card`).

:func:`~entityseg.models.checkpoint.read_checkpoint` reads such a folder as it reads a
``.ckpt``, so every entry point that takes a checkpoint takes a folder too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from entityseg.atomic_checkpoint import write_atomically
from entityseg.models.checkpoint import (
    INFERENCE_KEY,
    LIGHTNING_PREFIX,
    NET_CONFIG_KEY,
    VIEWS_KEY,
    CheckpointError,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "entityseg"
FORMAT_VERSION = 1
#: The whole ``config.json`` in the checkpoint-like dict of :func:`read_pretrained`.
PRETRAINED_KEY = "entityseg_pretrained"
#: Inference settings a model keeps in its ``config.json`` (those of its evaluation), which
#: :meth:`~entityseg.api.EntitySegmenter.from_pretrained` starts from.
STORED_SETTINGS = ("mode", "max_entities", "overlapping", "score_threshold", "compat")


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a model in this format)."""
    return (Path(path) / CONFIG_FILE).is_file()


def write_pretrained(
    folder: str | Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (each through a
    temporary file and a rename; the weights first, so a folder with a config is complete).
    ``config``: :func:`model_config`'s. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder; choose another one")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"format": "pt", "entityseg_format_version": str(FORMAT_VERSION)}
    write_atomically(folder / MODEL_FILE, lambda tmp: save_file(tensors, tmp, metadata))
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomically(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return folder


def model_config(
    network: Mapping[str, Any],
    views: Mapping[str, Any],
    settings: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of a model: ``network`` (CropFormer's arguments), ``views`` (the
    test-view keys, ``ViewConfig.to_keys()``), ``settings`` (inference settings; those of
    :data:`STORED_SETTINGS` are kept) and ``source`` (where the weights came from)."""
    from entityseg import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "entityseg_version": __version__,
        "network": _json_ready(network),
        "views": dict(views),
        "inference": {key: settings[key] for key in STORED_SETTINGS if key in settings},
        "source": dict(source or {}),
    }


def read_pretrained(folder: str | Path) -> dict[str, Any]:
    """The model in ``folder`` as a checkpoint dict (as :func:`~entityseg.models.checkpoint.
    read_checkpoint` gives a ``.ckpt``): the weights under ``state_dict``, the network
    configuration, test views and inference settings under the keys training writes.

    Nothing in the folder is unpickled: the weights are read by safetensors, the config as
    json. A missing file, a config that is not this format (or a newer version of it), or
    weights that do not read raise :class:`CheckpointError` in one line naming the file.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found (a model folder holds {MODEL_FILE})")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{weights}: not a readable safetensors file ({reason})") from None
    return {
        "state_dict": {LIGHTNING_PREFIX + k: v for k, v in state.items()},
        NET_CONFIG_KEY: config["network"],
        VIEWS_KEY: config["views"],
        INFERENCE_KEY: config.get("inference", {}),
        PRETRAINED_KEY: config,
    }


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json``, checked to be a model of this format (one line if not)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (not an entityseg model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid json ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(
            f'{path}: not an entityseg model config (it has no "format": "{FORMAT}")'
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r}; this entityseg reads up to {FORMAT_VERSION}: "
            "upgrade entityseg"
        )
    for key, kind in (("network", dict), ("views", dict)):
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} must be a json object")
    return config


def weights_file(path: str | Path) -> Path:
    """The file that holds a model's weights: the checkpoint itself, or a model folder's
    ``model.safetensors`` (what tells one model from another when resuming a run)."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def _json_ready(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts (as json writes and reads it)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
