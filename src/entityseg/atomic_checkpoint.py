"""Checkpoints written atomically: a run killed while saving never leaves a broken file.

Lightning's default writer streams into the final path; this one writes ``<path>.tmp`` in the
same folder, flushes it to disk and renames it over ``<path>`` (``os.replace`` is atomic on
POSIX), so ``last.ckpt`` is always either the previous or the new complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` that saves through a temporary file and a rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
