"""The resumable record of a prediction run: one shard per process, merged at the end.

Each process (rank ``r``) of ``python -m entityseg.predict`` appends every image it finishes
to its own ``predictions.rank<r>.jsonl`` (:func:`append_done`, synced to disk after the
image's outputs are), and every photo it cannot read to the same file (:func:`append_skipped`).
A shard's first line holds the settings that change the results. Shards are only ever
appended to by their owner and read by everyone, so no two processes write one file, and a
rerun with any number of processes reads them all (:func:`read_shards`): an image is done
when its latest line says so, for the same photo, with its outputs on disk. At the end rank 0
writes ``predictions.json`` from the shards in input order (:func:`merge_shards`), or, with
``merge=false``, a small index of them (:func:`write_index`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from entityseg.atomic_checkpoint import fsync_folder
from entityseg.inference.writing import InputError, write_whole

log = logging.getLogger(__name__)

#: The shard of rank ``r``: ``SHARD_NAME.format(rank=r)``.
SHARD_NAME = "predictions.rank{rank}.jsonl"
SHARD_GLOB = "predictions.rank*.jsonl"
#: The COCO results of every image, in input order, merged from the shards.
PREDICTIONS_NAME = "predictions.json"
#: With ``merge=false``: what the shards hold (counts, names, settings) instead.
INDEX_NAME = "predictions.index.json"


def shard_path(out_dir: Path, rank: int) -> Path:
    """The shard rank ``rank`` appends to."""
    return out_dir / SHARD_NAME.format(rank=rank)


def file_identity(path: Path) -> dict:
    """What tells one file from another for resuming: its resolved path, size and
    modification time (a file replaced or edited under the same name is another file)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class Recorded:
    """An image's latest line in the shards: done (``image_id``, the :func:`file_identity`
    of its photo) or skipped (``skipped``: why); where the line is, and when it was written."""

    shard: Path
    offset: int
    time: float
    image_id: int | None = None
    source: dict | None = None
    skipped: str | None = None

    @property
    def done(self) -> bool:
        return self.skipped is None


def _read_header(path: Path, f: BinaryIO) -> tuple[dict | None, int]:
    """A shard's settings and the length of its settings line (None, 0: no whole line)."""
    first = f.readline()
    if not first.endswith(b"\n"):
        return None, 0
    try:
        return json.loads(first)["settings"], len(first)
    except (ValueError, KeyError, TypeError):
        raise InputError(
            f"{path}: first line is not the settings of entityseg.predict: "
            "use another output= or delete the file"
        ) from None


def _read_shard(path: Path) -> tuple[dict | None, dict[str, Recorded], int]:
    """A shard's settings, its images by name (a later line of a name replaces an earlier
    one) and the end of its last whole line; a line cut by a kill is not read."""
    records: dict[str, Recorded] = {}
    with open(path, "rb") as f:
        settings, end = _read_header(path, f)
        if settings is None:
            return None, records, 0
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
                records[record["file_name"]] = Recorded(
                    shard=path,
                    offset=end,
                    time=float(record.get("time", 0.0)),
                    image_id=None if "skipped" in record else int(record["image_id"]),
                    source=record.get("source"),
                    skipped=record.get("skipped"),
                )
            except (ValueError, KeyError, TypeError):
                log.warning(
                    "%s: unreadable line at byte %d, its image is predicted again", path, end
                )
            end += len(line)
    return settings, records, end


def read_shards(out_dir: Path, settings: dict) -> dict[str, Recorded]:
    """Every image the shards of ``out_dir`` record, by name: its latest line of all shards.

    Read only (any process may call it while none writes). A shard that records nothing is
    ignored whatever its settings (its owner starts it again); one that records images made
    with other ``settings`` stops the run with one line naming what changed.
    """
    latest: dict[str, Recorded] = {}
    for path in sorted(out_dir.glob(SHARD_GLOB)):
        stored, records, _ = _read_shard(path)
        if not records:
            continue
        if stored != settings:
            changed = ", ".join(
                f"{key}: {stored.get(key)} -> {settings.get(key)}"
                for key in sorted(stored.keys() | settings.keys())
                if stored.get(key) != settings.get(key)
            )
            raise InputError(
                f"output={out_dir} holds predictions made with other settings ({changed}): "
                f"use another output= or delete its {SHARD_GLOB} to start again"
            )
        for name, record in records.items():
            if name not in latest or record.time >= latest[name].time:
                latest[name] = record
    return latest


def is_done(record: Recorded | None, path: Path, outputs: Iterable[Path]) -> bool:
    """Whether ``path`` was predicted already: its latest line is done, from this very file
    (not another of its name, nor an older version of it), and its ``outputs`` exist."""
    return (
        record is not None
        and record.done
        and record.source == file_identity(path)
        and all(output.is_file() for output in outputs)
    )


def open_shard(out_dir: Path, rank: int, settings: dict) -> BinaryIO:
    """Rank ``rank``'s shard, opened for appending: a line cut by a kill is removed, and a
    shard that records nothing is started again with ``settings``."""
    path = shard_path(out_dir, rank)
    records, end = {}, 0
    if path.is_file():
        _, records, end = _read_shard(path)
    if not records:
        path.write_bytes(json.dumps({"settings": settings}).encode() + b"\n")
        fsync_folder(out_dir)
    elif end < path.stat().st_size:
        os.truncate(path, end)
    return open(path, "ab")


def _append(shard: BinaryIO, record: dict) -> None:
    shard.write(json.dumps({**record, "time": time.time()}).encode() + b"\n")
    shard.flush()
    os.fsync(shard.fileno())


def append_done(
    shard: BinaryIO,
    name: str,
    path: Path,
    image_id: int,
    predictions: list[dict],
    compare: dict[str, int] | None = None,
) -> None:
    """Record a finished image (after its outputs are on disk): its name, id, the identity
    of the photo it was predicted from, its COCO results, and (``inference.compare``) the
    counts of its two modes' comparison."""
    record = {
        "file_name": name,
        "image_id": image_id,
        "source": file_identity(path),
        "predictions": predictions,
    }
    _append(shard, record if compare is None else {**record, "compare": compare})


def append_skipped(shard: BinaryIO, name: str, reason: str) -> None:
    """Record a photo that could not be predicted, and why (a rerun tries it again)."""
    _append(shard, {"file_name": name, "skipped": reason})


@dataclass
class RunSummary:
    """What the shards hold for a run's inputs: images predicted, their entities, and the
    skipped and missing (no line at all: a process died) names, in input order."""

    images: int = 0
    entities: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    missing: list[str] = field(default_factory=list)
    compared: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> counts


def merge_shards(
    names: Iterable[str], records: dict[str, Recorded], out: Path | None
) -> RunSummary:
    """``predictions.json`` at ``out`` (None: none written): the predictions of ``names``
    in their order, one image's line at a time, read back from the shards; and the summary."""
    summary = RunSummary()
    with ExitStack() as stack:
        shards = {
            p: stack.enter_context(open(p, "rb")) for p in {r.shard for r in records.values()}
        }
        merged = _predictions_in_order(names, records, shards, summary)
        if out is None:
            for _ in merged:  # counted into the summary only
                pass
        else:
            write_whole(out, lambda f: _write_json_list(f, merged))
            fsync_folder(out.parent)
    return summary


def _predictions_in_order(
    names: Iterable[str],
    records: dict[str, Recorded],
    shards: dict[Path, BinaryIO],
    summary: RunSummary,
) -> Iterator[dict]:
    """Each recorded image's predictions, read from its shard line, ``names``' order; the
    images, entities, skipped, missing and comparisons counted into ``summary``."""
    for name in names:
        record = records.get(name)
        if record is None:
            summary.missing.append(name)
            continue
        if not record.done:
            summary.skipped.append((name, record.skipped))
            continue
        shards[record.shard].seek(record.offset)
        line = json.loads(shards[record.shard].readline())
        if "compare" in line:
            summary.compared[name] = line["compare"]
        summary.images += 1
        summary.entities += len(line["predictions"])
        yield from line["predictions"]


def _write_json_list(f: BinaryIO, items: Iterable[dict]) -> None:
    """A json list, one item at a time (a million images' predictions never in memory)."""
    f.write(b"[")
    for number, item in enumerate(items):
        f.write((b", " if number else b"") + json.dumps(item).encode())
    f.write(b"]")


def write_index(out_dir: Path, summary: RunSummary, settings: dict, shown: int = 1000) -> Path:
    """``predictions.index.json`` for ``merge=false``: the shards that are the product, what
    they hold, the settings, and the first ``shown`` skipped names."""
    index = {
        "format": "entityseg predict shards: after the settings line, one json line per image "
        '({"file_name", "image_id", "source", "predictions": COCO results}) or per skipped '
        'photo ({"file_name", "skipped"}); the latest line of a name counts',
        "shards": sorted(p.name for p in out_dir.glob(SHARD_GLOB)),
        "images": summary.images,
        "entities": summary.entities,
        "skipped": len(summary.skipped),
        "skipped_names": [name for name, _ in summary.skipped[:shown]],
        "settings": settings,
    }
    path = out_dir / INDEX_NAME
    write_whole(path, lambda f: f.write(json.dumps(index, indent=2).encode()))
    return path


class ShardLines:
    """The lines each shard of ``out_dir`` gained since this was made (each an image
    finished or skipped by its process), read incrementally: a progress bar's count, and
    which processes stopped before the end of their share."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._offsets = {p: p.stat().st_size for p in out_dir.glob(SHARD_GLOB)}
        self.gained: dict[Path, int] = {}

    def total(self) -> int:
        """Lines gained by all shards, read up to now."""
        for path in self.out_dir.glob(SHARD_GLOB):
            self._read(path)
        return sum(self.gained.values())

    def of_rank(self, rank: int) -> int:
        """Lines gained by rank ``rank``'s shard, read up to now."""
        path = shard_path(self.out_dir, rank)
        if path.is_file():
            self._read(path)
        return self.gained.get(path, 0)

    def _read(self, path: Path) -> None:
        start = self._offsets.get(path, 0)
        size = path.stat().st_size
        if size < start:  # its owner cut a half-written line
            start = self._offsets[path] = size
        if size > start:
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read(size - start)
            whole = chunk.rfind(b"\n") + 1
            header = start == 0 and chunk.startswith(b'{"settings"')
            self.gained[path] = self.gained.get(path, 0) + chunk.count(b"\n") - header
            self._offsets[path] = start + whole
