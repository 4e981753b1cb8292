"""Load network weights from a training checkpoint or a plain state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: Attribute under which the LightningModule holds the network: its keys are ``net.<name>``.
LIGHTNING_PREFIX = "net."


def load_weights(net: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``net`` strictly, with one clear error for a wrong file.

    Accepts a Lightning checkpoint (``{"state_dict": {"net.<name>": ...}}``), ``{"model": sd}``,
    ``{"state_dict": sd}`` or a bare state dict of the network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint
    if isinstance(checkpoint, dict):
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state dict in the checkpoint")
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {
            k[len(LIGHTNING_PREFIX) :]: v
            for k, v in state.items()
            if k.startswith(LIGHTNING_PREFIX)
        }
    expected = net.state_dict()
    problems = [
        *(f"missing {k}" for k in expected if k not in state),
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
        raise ValueError(f"{path}: does not fit this network: {shown}")
    net.load_state_dict(state)
