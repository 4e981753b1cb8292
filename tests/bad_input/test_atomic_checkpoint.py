"""AtomicCheckpointIO (issue #21): a failed save leaves no temporary file and the previous
checkpoint as it was; a completed save flushes the folder after the rename."""

import errno
import os
import stat

import pytest
import torch

from entityseg.atomic_checkpoint import AtomicCheckpointIO


@pytest.fixture
def previous(tmp_path):
    """``last.ckpt`` from an earlier save, alone in its folder."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    return path


def assert_untouched(previous):
    assert torch.load(previous, weights_only=True) == {"step": 1}
    assert [p.name for p in previous.parent.iterdir()] == [previous.name]


def test_a_full_disk_removes_the_temporary_file_and_raises_its_error(previous, monkeypatch):
    full = OSError(errno.ENOSPC, "No space left on device")

    def full_disk(obj, f):  # writes a part, then fails
        f.write(b"half a checkpoint")
        raise full

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, previous)
    assert err.value is full
    assert_untouched(previous)


def test_an_object_that_does_not_pickle_removes_the_temporary_file(previous):
    with pytest.raises(Exception, match="lambda"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "hook": lambda: None}, previous)
    assert_untouched(previous)


def test_the_folder_is_flushed_after_the_rename(previous, monkeypatch):
    events = []
    replace, fsync = os.replace, os.fsync

    def recorded_replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        replace(src, dst)

    def recorded_fsync(fd):
        info = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "file"
        events.append(("fsync", kind, info.st_ino))
        fsync(fd)

    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, previous)
    assert events == [
        ("fsync", "file", events[0][2]),
        ("replace", "last.ckpt"),
        ("fsync", "folder", previous.parent.stat().st_ino),
    ]
    assert torch.load(previous, weights_only=True) == {"step": 2}
    assert [p.name for p in previous.parent.iterdir()] == [previous.name]
