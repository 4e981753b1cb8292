"""Check a COCO RLE before pycocotools sees it: pycocotools trusts its input.

pycocotools decodes run lengths into a buffer of ``height x width`` without checking that they
add up to it: counts that sum short leave uninitialised bytes in the mask (values such as 32 or
99), counts that sum long write past it, a negative run (a compressed count whose delta goes
below zero) becomes a 4-billion-pixel run, and the IoU of an RLE that sums short never ends
(``maskUtils.iou`` of a prediction with counts ``"zzzzzzzz"``). :func:`check_rle` reads the
run lengths itself, with a few numpy passes over the characters (linear in their number,
whatever they hold: a hostile ``counts`` costs microseconds), and raises ``ValueError`` with a
one-line description of the first problem.

Compressed counts are pycocotools' ``rleToString`` text (``rleFrString`` in ``maskApi.c``
reads it): each number is written 5 bits per character, low bits first, as
``chr(48 + bits)`` with ``0x20`` set on every character but the number's last, whose ``0x10``
bit is the sign; from the fourth number on (index 3), a number is the difference to the run
two before it. So every character is one of ``'0'`` (48) .. ``'o'`` (111).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The most characters one number of compressed counts may take: 30 bits, which holds every
#: run and every delta of an image under 2^29 pixels (23170 x 23170); pycocotools computes
#: longer numbers in 32-bit ``int`` shifts, which overflow.
MAX_NUMBER_CHARS = 6


def check_rle(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The run lengths (int64 ``[m]``) of a COCO RLE of a ``height x width`` image, checked.

    ``segmentation`` is ``{"size": [height, width], "counts": ...}`` with ``counts`` either
    compressed (``str`` or ``bytes``, see the module docstring) or uncompressed (a list of
    non-negative ``int``). Every run must be >= 0 and the runs must sum to exactly
    ``height * width``. Raises ``ValueError`` with a one-line problem (without the file or
    annotation, which the caller adds), e.g. ``RLE counts sum to 1000, not 12 x 100 = 1200``.
    """
    if not isinstance(segmentation, Mapping):
        raise ValueError(f"an RLE must be an object, not {describe(segmentation)}")
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if size is None or counts is None:
        raise ValueError("RLE without 'size' and 'counts'")
    if (
        not isinstance(size, Sequence)
        or isinstance(size, str | bytes)
        or len(size) != 2
        or not all(is_int(s) for s in size)
    ):
        raise ValueError(f"RLE size must be two integers [height, width], not {describe(size)}")
    if [int(s) for s in size] != [height, width]:
        raise ValueError(
            f"RLE size {[int(s) for s in size]} disagrees with image size [{height}, {width}]"
        )
    if isinstance(counts, str | bytes):
        runs = _compressed_runs(counts)
        _check_sum(int(runs.sum()), height, width)
        return runs
    if isinstance(counts, list):
        _check_uncompressed(counts)
        _check_sum(sum(counts), height, width)  # Python ints: no overflow before the check
        return np.asarray(counts, dtype=np.int64)
    raise ValueError(
        "RLE counts must be a string (compressed) or a list of integers (uncompressed), "
        f"not {describe(counts)}"
    )


def _check_sum(total: int, height: int, width: int) -> None:
    if total != height * width:
        raise ValueError(f"RLE counts sum to {total}, not {height} x {width} = {height * width}")


def _compressed_runs(counts: str | bytes) -> np.ndarray:
    """The runs of compressed counts as ``rleFrString`` decodes them, vectorised: one pass of
    numpy operations over the characters (linear in their number, whatever they hold)."""
    codes = np.frombuffer(_ascii(counts), dtype=np.uint8)
    bits = codes.astype(np.int32) - 48  # int32 per character: 6 x 5 bits fit
    bad = np.flatnonzero((bits < 0) | (bits > 63))
    if bad.size:
        position = int(bad[0])
        raise ValueError(
            f"RLE counts: character {chr(codes[position])!r} at position {position} is not "
            "one of '0'..'o'"
        )
    last = (bits & 0x20) == 0  # the last character of a number: no continuation bit
    if bits.size and not last[-1]:
        raise ValueError("RLE counts end in the middle of a number")
    ends = np.flatnonzero(last)
    if not ends.size:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    too_long = np.flatnonzero(lengths > MAX_NUMBER_CHARS)
    if too_long.size:
        raise ValueError(
            f"RLE counts: number {int(too_long[0])} is longer than {MAX_NUMBER_CHARS} characters"
        )
    offsets = np.arange(bits.size, dtype=np.int32) - np.repeat(starts, lengths).astype(np.int32)
    values = np.add.reduceat((bits & 0x1F) << (5 * offsets), starts).astype(np.int64)
    sign = (bits[ends] & 0x10) != 0  # on a number's last character: the number is negative
    values -= np.where(sign, np.left_shift(1, 5 * lengths), 0)
    runs = values.copy()  # from index 3 on, a number is the delta to the run two before
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    negative = np.flatnonzero(runs < 0)
    if negative.size:
        index = int(negative[0])
        raise ValueError(f"RLE counts: run {index} decodes to {int(runs[index])}, below 0")
    return runs


def _ascii(counts: str | bytes) -> bytes:
    """``counts`` as bytes; a non-ASCII character is out of range (named with its position)."""
    if isinstance(counts, bytes):
        return counts
    try:
        return counts.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"RLE counts: character {counts[err.start]!r} at position {err.start} is not one "
            "of '0'..'o'"
        ) from None


def _check_uncompressed(counts: list) -> None:
    """Every run of uncompressed counts must be a non-negative ``int``."""
    for index, run in enumerate(counts):
        if not is_int(run) or run < 0:
            raise ValueError(f"RLE counts: run {index} is {describe(run)}, not an integer >= 0")


def is_int(value: Any) -> bool:
    """An integer, not a bool (json's ``true`` is no count, size or id)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def describe(value: Any) -> str:
    """A short name of a json value for error messages: ``null``, ``true``, ``a list``,
    ``nan``, ``'text'`` (strings cut at 20 characters)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 20 else value[:20] + "...")
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
