"""The one error type of the data pipeline: bad input, reported as one line naming the file."""

from __future__ import annotations

from pathlib import Path


class EntityDataError(ValueError):
    """A file or annotation that cannot be used, e.g. ``a.json: annotation 7: empty polygon``.

    The message is always one line, so that a skip logged during training and a failure in
    strict mode read the same way and name what to fix.
    """

    def __init__(self, source: str | Path, problem: str, ann_id: int | None = None) -> None:
        where = f"{source}: annotation {ann_id}" if ann_id is not None else f"{source}"
        self.source = str(source)
        self.ann_id = ann_id
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{where}: {self.problem}")
