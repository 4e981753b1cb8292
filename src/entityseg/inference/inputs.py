"""Which images a prediction run predicts, and the name each one's outputs and record carry.

``input=`` of ``python -m entityseg.predict`` is an image, a folder (its images, or with
``recursive`` every image under it), a text file listing one image per line
(:data:`LIST_SUFFIXES`), or a glob; :func:`find_inputs` turns it into :class:`Inputs`, a
sequence of :class:`InputImage` in a fixed order. Each image is named by its path relative to
one root folder (``a/1.jpg``), so that photos of one file name in two folders stay apart. A list
of a million lines is not held in memory: only the byte offset of each line is, and an image's
line is read when it is asked for. :func:`check_unique_outputs` and
:func:`check_outputs_spare_inputs` stop a run, in one line, before it would write one image's
outputs over another's or over an input; both work on names, without touching each file.
"""

from __future__ import annotations

import glob
import os
import posixpath
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, overload

import numpy as np

from entityseg.data.coco_entity import IMAGE_SUFFIXES
from entityseg.inference.writing import InputError, partial_path

#: ``input=`` a text file with these suffixes: one image path per line.
LIST_SUFFIXES = (".txt", ".lst")

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class InputImage:
    """An image to predict: where to read it, and its name (its path relative to
    :attr:`Inputs.root`, posix), which names its outputs and its record."""

    path: Path
    name: str


class Inputs(Sequence[InputImage]):
    """The images of ``input=`` in their fixed order (``len``, ``inputs[i]``, iteration).

    ``pattern`` is ``input=`` as given, ``root`` the folder every name is relative to, and
    ``unlisted`` the images in subfolders of a folder input left out (not recursive), else 0.
    """

    def __init__(self, pattern: str, root: Path, names: list[str], unlisted: int = 0) -> None:
        self.pattern = pattern
        self.root = root
        self.unlisted = unlisted
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> InputImage: ...
    @overload
    def __getitem__(self, index: slice) -> list[InputImage]: ...
    def __getitem__(self, index: int | slice) -> InputImage | list[InputImage]:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"input {index} of {len(self)}")
        return self._get(index % len(self))

    def _get(self, index: int) -> InputImage:
        name = self._names[index]
        return InputImage(self.root / name, name)

    def __iter__(self) -> Iterator[InputImage]:
        root = self.root
        return (InputImage(root / name, name) for name in self.names())

    def names(self) -> Iterator[str]:
        """The names in order, without building a path for each."""
        return iter(self._names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern!r}: {len(self)} images under {self.root})"


class _ListedInputs(Inputs):
    """The images of a list file, read lazily: only the byte offset of each listed line is
    kept (``_offsets``, int64), and ``inputs[i]`` reads its line again."""

    def __init__(
        self,
        pattern: str,
        list_path: Path,
        folder: str,
        root: str,
        offsets: np.ndarray,
        identity: tuple[int, int],
    ) -> None:
        super().__init__(pattern, Path(root), [])
        self._list_path = list_path
        self._folder = folder  # absolute: the folder of a relative line
        self._prefix = root.rstrip(os.sep) + os.sep  # cut from a line's path, leaves its name
        self._offsets = offsets
        self._identity = identity  # (size, mtime_ns): a list edited during the run is caught

    def __len__(self) -> int:
        return len(self._offsets)

    def _get(self, index: int) -> InputImage:
        with self._open() as f:
            f.seek(int(self._offsets[index]))
            return self._image(f.readline())

    def __iter__(self) -> Iterator[InputImage]:
        return (self._image(raw) for raw in self._lines())

    def names(self) -> Iterator[str]:
        cut = len(self._prefix)
        return (self._path(raw)[cut:].replace(os.sep, "/") for raw in self._lines())

    def _lines(self) -> Iterator[bytes]:
        """The listed lines in order, read in one pass."""
        with self._open() as f:
            for start in range(0, len(self._offsets), 1 << 16):  # no million ints at once
                for offset in self._offsets[start : start + (1 << 16)].tolist():
                    f.seek(offset)
                    yield f.readline()

    @contextmanager
    def _open(self) -> Iterator[BinaryIO]:
        """The list file, unless it changed since it was read (its offsets would be wrong)."""
        with open(self._list_path, "rb") as f:
            stat = os.fstat(f.fileno())
            if (stat.st_size, stat.st_mtime_ns) != self._identity:
                raise InputError(
                    f"input={self.pattern}: the list changed since this run read it: start it again"
                )
            yield f

    def _path(self, raw: bytes) -> str:
        return os.path.normpath(os.path.join(self._folder, raw.decode("utf-8").strip()))

    def _image(self, raw: bytes) -> InputImage:
        path = self._path(raw)
        return InputImage(Path(path), path[len(self._prefix) :].replace(os.sep, "/"))


def find_inputs(pattern: str, recursive: bool = False) -> Inputs:
    """The images of ``input=``: an image file, a folder's images (with ``recursive``, every
    image under it), the images a list file names, or the files matching a glob.

    Hidden files and folders of a folder are skipped (an output folder's partial files are
    never inputs). Stops with one line when there is nothing to predict.
    """
    path = Path(pattern)
    if path.is_dir():
        return _find_in_folder(pattern, path, recursive)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return _read_list(pattern, path)
        return Inputs(pattern, path.parent, [path.name])
    return _find_glob(pattern)


def _is_image(file_name: str) -> bool:
    return not file_name.startswith(".") and (
        os.path.splitext(file_name)[1].lower() in IMAGE_SUFFIXES
    )


def _find_in_folder(pattern: str, folder: Path, recursive: bool) -> Inputs:
    """A folder's images, sorted by their path parts; not recursive, counts those below."""
    names: list[str] = []
    unlisted = 0
    top = str(folder)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images = [f for f in filenames if _is_image(f)]
        if dirpath == top:
            names += images
        elif recursive:
            prefix = os.path.relpath(dirpath, top).replace(os.sep, "/") + "/"
            names += [prefix + f for f in images]
        else:
            unlisted += len(images)
    names.sort(key=lambda name: tuple(name.split("/")))
    if not names:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        message = f"input={pattern}: no image ({suffixes}) in this folder"
        if unlisted:
            raise InputError(
                f"{message}, {unlisted} in its subfolders: add input_recursive=true to predict them"
            )
        raise InputError(f"{message}: nothing to do")
    return Inputs(pattern, folder, names, unlisted)


def _find_glob(pattern: str) -> Inputs:
    """The files matching a glob, named relative to its leading folder without magic."""
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = Path(*parts[:fixed]) if fixed else Path(".")
    matches = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not matches:
        raise InputError(
            f"input={pattern}: no such file or folder, no file matches it: nothing to do"
        )
    names = sorted(p.relative_to(root).parts for p in matches)
    return Inputs(pattern, root, ["/".join(name) for name in names])


def _read_list(pattern: str, list_path: Path) -> Inputs:
    """The images a list file names, in one pass that keeps only the offset of each line.

    Blank lines and ``#`` comments are skipped; a relative line is relative to the list's
    folder. The root is the deepest folder common to all lines, found in the same pass.
    """
    folder = os.path.abspath(list_path.parent)  # relative and absolute lines share one root
    offsets = array("q")
    common: str | None = None
    inside = ""
    end = 0
    with open(list_path, "rb") as f:
        stat = os.fstat(f.fileno())
        for number, raw in enumerate(f, start=1):
            start, end = end, end + len(raw)
            if number == 1 and raw.startswith(_BOM):
                start, raw = start + len(_BOM), raw[len(_BOM) :]
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(
                    f"input={pattern}: line {number} is not UTF-8 text: write the list in UTF-8"
                ) from None
            if not line or line.startswith("#"):
                continue
            offsets.append(start)
            parent = os.path.dirname(os.path.normpath(os.path.join(folder, line)))
            if common is None or (parent != common and not parent.startswith(inside)):
                common = parent if common is None else os.path.commonpath((common, parent))
                inside = common.rstrip(os.sep) + os.sep
    if not offsets:
        raise InputError(f"input={pattern}: lists no image: nothing to do")
    identity = (stat.st_size, stat.st_mtime_ns)
    return _ListedInputs(
        pattern, list_path, folder, common, np.asarray(offsets, dtype=np.int64), identity
    )


def _without_suffix(name: str) -> str:
    return posixpath.splitext(name)[0]


def check_unique_outputs(inputs: Inputs) -> None:
    """Stop in one line if two inputs would write the same outputs (``a/1.jpg`` and
    ``a/1.png``); ``a/1.jpg`` and ``b/1.jpg`` are apart."""
    seen: set[str] = set()
    for index, name in enumerate(inputs.names()):
        stem = _without_suffix(name)
        if stem in seen:
            first = next(image for image in inputs if _without_suffix(image.name) == stem)
            raise InputError(
                f"input: {first.path} and {inputs[index].path} would both write the outputs "
                f"of {stem}: predict them into different output= folders"
            )
        seen.add(stem)


def check_outputs_spare_inputs(
    out_dir: Path,
    inputs: Inputs,
    outputs_of: Callable[[str], Iterable[str]],
    run_files: Iterable[str],
    others: Iterable[str | Path | None] = (),
) -> None:
    """Stop in one line when a file this run writes would be one of its inputs (an image, the
    checkpoint, ``gt``): ``input=D output=D`` would replace ``D/photo.png`` by its id map.

    The run writes ``run_files`` and each input's ``outputs_of(name)`` (posix, relative to
    ``out_dir``), each first under its partial name. Every input is ``root/name``, so outputs
    are compared as names: nothing is resolved or looked up per input.
    """
    out = out_dir.resolve()
    root = inputs.root.resolve()
    # the inputs an output could be, by the output's name under out_dir: the input of output
    # ``rel`` is ``below + rel`` when out_dir is (in) the root, ``rel[len(above):]`` when the
    # root is in out_dir
    hit: set[str] = set()
    below = above = ""
    if out == root or out.is_relative_to(root):
        below = "" if out == root else out.relative_to(root).as_posix() + "/"
        hit = {name[len(below) :] for name in inputs.names() if name.startswith(below)}
    elif root.is_relative_to(out):
        above = root.relative_to(out).as_posix() + "/"
        hit = {above + name for name in inputs.names()}
    # the other inputs (checkpoint, gt=) that lie in out_dir, by their name there
    other_names: dict[str, str] = {}
    for other in others:
        if other is None or other == "":
            continue
        resolved = Path(other).resolve()
        if resolved.is_relative_to(out) and resolved != out:
            other_names[resolved.relative_to(out).as_posix()] = str(other)
    if not hit and not other_names:
        return

    def check(rel: str) -> None:
        for written in (rel, partial_path(PurePosixPath(rel)).as_posix()):
            if written in hit:
                victim = str(inputs.root / (below + written[len(above) :]))
            elif written in other_names:
                victim = other_names[written]
            else:
                continue
            raise InputError(
                f"output={out_dir}: predict would write {out_dir / written}, which is the "
                f"input {victim}: choose another output= folder"
            )

    for rel in run_files:
        check(rel)
    for name in inputs.names():
        for rel in outputs_of(name):
            check(rel)
