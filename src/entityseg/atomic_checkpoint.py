"""Checkpoints written atomically: a run killed while saving never leaves a broken file.

Lightning's default writer streams into the final path; this one writes ``<path>.tmp`` in the
same folder, flushes it to disk and renames it over ``<path>`` (``os.replace`` is atomic on
POSIX), then flushes the folder so that the rename is on disk too. ``last.ckpt`` is always
either the previous or the new complete checkpoint, and a save that fails (a full disk, an
object that does not pickle) removes its temporary file and raises the error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through ``<path>.tmp`` and a rename (see the module)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; POSIX only (Windows opens no folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` that saves through a temporary file and a rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        save_atomically(checkpoint, path)
