"""Checkpoints written atomically: a run killed while saving never leaves a broken file.

Lightning's default writer streams into the final path; this one writes ``<path>.tmp`` in the
same folder, flushes it to disk and renames it over ``<path>`` (``os.replace`` is atomic on
POSIX), then flushes the folder so that the rename is on disk too. ``last.ckpt`` is always
either the previous or the new complete checkpoint, and a save that fails (a full disk, an
object that does not pickle) removes its temporary file and raises the error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through ``<path>.tmp`` and a rename (see the module)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomically(path, save)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through ``<path>.tmp``: ``write`` writes the temporary file (given its
    path), which is flushed to disk and renamed over ``path``; on any failure (Ctrl-C too) the
    temporary file is removed and the error raised. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


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
