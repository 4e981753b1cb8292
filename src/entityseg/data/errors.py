"""The one error type of the data pipeline: bad input, reported as one line naming the file."""

from __future__ import annotations

from pathlib import Path

from entityseg.config import UserError


class EntityDataError(UserError):
    """A file or annotation that cannot be used, e.g. ``a.json: annotation 7: empty polygon``.

    The message is always one line, so that a skip logged during training and a failure in
    strict mode read the same way and name what to fix.
    """

    def __init__(
        self, source: str | Path, problem: str | None = None, ann_id: int | None = None
    ) -> None:
        if problem is None:  # re-raised by a DataLoader worker (below): only the message
            source, problem = "", _original_message(str(source))
        where = f"{source}: annotation {ann_id}" if ann_id is not None else f"{source}"
        where = f"{where}: " if where else ""
        self.source = str(source)
        self.ann_id = ann_id
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{where}{self.problem}")


def _original_message(text: str) -> str:
    """The one-line message of an error that a DataLoader worker raised.

    PyTorch re-raises a worker's exception in the main process as ``type(message)``, where
    ``message`` is the worker's whole traceback; its last ``EntityDataError:`` line is the
    original message, which is all a user needs.
    """
    marker = f"{EntityDataError.__name__}: "
    lines = [line for line in text.splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1] if lines else text
