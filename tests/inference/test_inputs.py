"""find_inputs and the checks of a run's inputs: names relative to a root, a lazily read list,
one-line errors."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from entityseg.data.coco_entity import IMAGE_SUFFIXES
from entityseg.inference.inputs import (
    InputImage,
    check_outputs_spare_inputs,
    check_unique_outputs,
    find_inputs,
)
from entityseg.inference.writing import InputError, partial_path

SUFFIXES = " ".join(sorted(IMAGE_SUFFIXES))
RUN_FILES = ["predictions.json", "predictions.rank0.jsonl"]


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def pictures(name: str) -> list[str]:
    """The outputs predict writes for an input name: its id map and overlay."""
    stem = name.rsplit(".", 1)[0]
    return [f"{stem}.png", f"{stem}_overlay.jpg"]


def names(inputs) -> list[str]:
    return [image.name for image in inputs]


def test_single_file(tmp_path):
    touch(tmp_path / "photos" / "cat.JPG")
    inputs = find_inputs(str(tmp_path / "photos" / "cat.JPG"))
    assert list(inputs) == [InputImage(tmp_path / "photos" / "cat.JPG", "cat.JPG")]
    assert (inputs.root, inputs.unlisted, len(inputs)) == (tmp_path / "photos", 0, 1)


def test_folder_sorted_hidden_skipped_subfolders_counted(tmp_path):
    d = tmp_path / "d"
    touch(d / "b.jpg", d / "a.PNG", d / ".x.png.partial", d / ".hidden.jpg", d / "notes.txt")
    touch(d / "sub" / "c.jpg", d / "sub" / "deeper" / "e.webp", d / ".cache" / "f.jpg")
    inputs = find_inputs(str(d))
    assert names(inputs) == ["a.PNG", "b.jpg"]
    assert [image.path for image in inputs] == [d / "a.PNG", d / "b.jpg"]
    assert inputs[-1] == inputs[1] == InputImage(d / "b.jpg", "b.jpg")
    assert inputs[:1] == [InputImage(d / "a.PNG", "a.PNG")]
    with pytest.raises(IndexError):
        inputs[2]
    assert (inputs.root, inputs.pattern, inputs.unlisted) == (d, str(d), 2)

    only_below = tmp_path / "only_below"
    touch(only_below / "x" / "1.jpg", only_below / "y" / "2.jpg", only_below / "z" / "3.jpg")
    with pytest.raises(InputError) as err:
        find_inputs(str(only_below))
    assert str(err.value) == (
        f"input={only_below}: no image ({SUFFIXES}) in this folder, 3 in its subfolders: "
        "add input_recursive=true to predict them"
    )
    assert names(find_inputs(str(only_below), recursive=True)) == ["x/1.jpg", "y/2.jpg", "z/3.jpg"]


def test_recursive_names_order_and_repeated_stems(tmp_path):
    r = tmp_path / "r"
    touch(r / "a-b" / "3.jpg", r / "a" / "b" / "2.png", r / "a" / "1.jpg", r / "1.jpg")
    touch(r / ".hidden" / "4.jpg", r / "a" / ".1.png.partial", r / "a" / "readme.md")
    os.symlink(r / "a", r / "link")  # a symlinked folder is not followed
    inputs = find_inputs(str(r), recursive=True)
    # by path parts: "a" < "a-b" although "a-b/..." < "a/..." as strings
    assert names(inputs) == ["1.jpg", "a/1.jpg", "a/b/2.png", "a-b/3.jpg"]
    assert [image.path for image in inputs] == [r / name for name in names(inputs)]
    assert (inputs.root, inputs.unlisted) == (r, 0)
    check_unique_outputs(inputs)  # 1.jpg and a/1.jpg write 1.png and a/1.png

    touch(r / "a" / "1.png")
    with pytest.raises(InputError) as err:
        check_unique_outputs(find_inputs(str(r), recursive=True))
    assert str(err.value) == (
        f"input: {r / 'a' / '1.jpg'} and {r / 'a' / '1.png'} would both write the outputs of "
        "a/1: predict them into different output= folders"
    )


def test_glob_root_and_names(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    touch(photos / "x" / "1.jpg", photos / "2.jpg", photos / "3.png", photos / "x" / "y" / "4.jpg")
    (photos / "folder.jpg").mkdir()  # plain files only
    inputs = find_inputs(f"{tmp_path}/photos/**/*.jpg")
    assert inputs.root == photos
    assert names(inputs) == ["2.jpg", "x/1.jpg", "x/y/4.jpg"]
    assert [image.path for image in inputs] == [
        photos / "2.jpg",
        photos / "x/1.jpg",
        photos / "x/y/4.jpg",
    ]

    monkeypatch.chdir(photos)
    inputs = find_inputs("*/1.jpg")  # magic first part: the root is the working folder
    assert (inputs.root, names(inputs), inputs[0].path) == (Path("."), ["x/1.jpg"], Path("x/1.jpg"))


def test_list_relative_absolute_comment_blank(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    touch(photos / "a" / "1.jpg", photos / "b" / "2.jpg")
    listed = tmp_path / "lists" / "todo.txt"
    listed.parent.mkdir()
    lines = [
        b"# photos to predict\r\n",
        b"\n",
        b"  ../photos/a/1.jpg  \r\n",
        b"   \n",
        str(photos / "b" / "2.jpg").encode() + b"\n",
        "../photos/b/../a/été.jpg".encode(),  # no newline at the end
    ]
    listed.write_bytes(b"".join(lines))
    monkeypatch.chdir(tmp_path)
    inputs = find_inputs("lists/todo.txt")  # relative lines are relative to the list's folder
    assert inputs.root == photos
    assert names(inputs) == ["a/1.jpg", "b/2.jpg", "a/été.jpg"]
    assert [image.path for image in inputs] == [
        photos / "a/1.jpg",
        photos / "b/2.jpg",
        photos / "a/été.jpg",
    ]
    assert inputs[1] == InputImage(photos / "b" / "2.jpg", "b/2.jpg")
    assert inputs[-1].name == "a/été.jpg"
    assert inputs[1:] == [inputs[1], inputs[2]]
    with pytest.raises(IndexError):
        inputs[3]
    assert (inputs.pattern, inputs.unlisted) == ("lists/todo.txt", 0)

    # only the offsets of the lines are kept: no list of a line per image
    assert isinstance(inputs._offsets, np.ndarray) and inputs._offsets.dtype == np.int64
    starts = np.cumsum([0] + [len(line) for line in lines])
    assert inputs._offsets.tolist() == [starts[2], starts[4], starts[5]]
    held = [
        value
        for value in vars(inputs).values()
        if isinstance(value, list | tuple | set | dict)
        and any(isinstance(item, str | bytes | Path) for item in value)
    ]
    assert held == []
    assert list(pickle.loads(pickle.dumps(inputs))) == list(inputs)  # to worker processes

    listed.write_bytes(b"other.jpg\n")
    with pytest.raises(InputError, match=r"^input=lists/todo.txt: the list changed since"):
        inputs[0]


def test_list_of_one_image_and_utf8_bom(tmp_path):
    touch(tmp_path / "a" / "b" / "c.jpg")
    listed = tmp_path / "one.lst"
    listed.write_bytes(b"\xef\xbb\xbfa/b/c.jpg\n")
    inputs = find_inputs(str(listed))
    assert (inputs.root, list(inputs)) == (
        tmp_path / "a" / "b",
        [InputImage(tmp_path / "a/b/c.jpg", "c.jpg")],
    )


def test_list_of_200000_lines(tmp_path):
    lines = [f"d{i % 97}/sub{i % 5}/img{i}.jpg" for i in range(200_000)]
    listed = tmp_path / "big.txt"
    listed.write_text("# a big list\n" + "\n".join(lines) + "\n")
    inputs = find_inputs(str(listed))
    assert len(inputs) == len(lines)
    assert inputs.root == tmp_path
    for i in [0, 1, 96, 199_999, *random.Random(0).sample(range(len(lines)), 200)]:
        assert inputs[i] == InputImage(tmp_path / lines[i], lines[i])
    assert inputs[-1].name == lines[-1]
    assert list(inputs.names()) == lines
    check_unique_outputs(inputs)


def test_list_line_not_utf8(tmp_path):
    listed = tmp_path / "bad.txt"
    listed.write_bytes(b"a.jpg\n# \xe9 comment\n")
    with pytest.raises(InputError) as err:
        find_inputs(str(listed))
    assert str(err.value) == f"input={listed}: line 2 is not UTF-8 text: write the list in UTF-8"


def test_nothing_to_do_messages(tmp_path):
    empty = tmp_path / "empty"
    touch(empty / "notes.txt", empty / ".hidden.jpg")
    for recursive in (False, True):
        with pytest.raises(InputError) as err:
            find_inputs(str(empty), recursive=recursive)
        assert (
            str(err.value) == f"input={empty}: no image ({SUFFIXES}) in this folder: nothing to do"
        )

    for pattern in (f"{empty}/*.jpg", str(tmp_path / "missing.jpg"), str(tmp_path / "missing")):
        with pytest.raises(InputError) as err:
            find_inputs(pattern)
        assert str(err.value) == (
            f"input={pattern}: no such file or folder, no file matches it: nothing to do"
        )

    listed = tmp_path / "none.txt"
    listed.write_text("# nothing yet\n\n   \n")
    with pytest.raises(InputError) as err:
        find_inputs(str(listed))
    assert str(err.value) == f"input={listed}: lists no image: nothing to do"


def test_output_folder_is_input_folder(tmp_path):
    d = tmp_path / "d"
    touch(d / "photo.png", d / "cat.jpg")
    with pytest.raises(InputError) as err:
        check_outputs_spare_inputs(d, find_inputs(str(d)), pictures, RUN_FILES)
    assert str(err.value) == (
        f"output={d}: predict would write {d / 'photo.png'}, which is the input "
        f"{d / 'photo.png'}: choose another output= folder"
    )

    # the same inputs into another folder (the checkpoint beside them) pass
    out = tmp_path / "out"
    check_outputs_spare_inputs(
        out, find_inputs(str(d)), pictures, RUN_FILES, [str(d / "model.ckpt"), None]
    )


def test_output_folder_inside_recursive_input(tmp_path):
    r = tmp_path / "r"
    touch(r / "x.jpg", r / "out" / "x.png")  # out/x.png: a picture of a previous run
    inputs = find_inputs(str(r), recursive=True)
    assert names(inputs) == ["out/x.png", "x.jpg"]
    with pytest.raises(InputError) as err:
        check_outputs_spare_inputs(r / "out", inputs, pictures, RUN_FILES)
    assert str(err.value) == (
        f"output={r / 'out'}: predict would write {r / 'out' / 'x.png'}, which is the input "
        f"{r / 'out' / 'x.png'}: choose another output= folder"
    )
    # not recursive, out/x.png is no input
    check_outputs_spare_inputs(r / "out", find_inputs(str(r)), pictures, RUN_FILES)


def test_partial_name_of_an_output_is_an_input(tmp_path):
    d = tmp_path / "d"
    touch(d / "a" / "1.jpg", d / "a" / ".1.png.partial")
    listed = tmp_path / "list.txt"
    listed.write_text("d/a/1.jpg\nd/a/.1.png.partial\n")
    inputs = find_inputs(str(listed))
    assert (inputs.root, names(inputs)) == (d / "a", ["1.jpg", ".1.png.partial"])
    with pytest.raises(InputError) as err:
        check_outputs_spare_inputs(d / "a", inputs, pictures, RUN_FILES)
    written = partial_path(d / "a" / "1.png")
    assert str(err.value) == (
        f"output={d / 'a'}: predict would write {written}, which is the input {written}: "
        "choose another output= folder"
    )

    # nested names: the partial file sits beside its output, in the same subfolder
    with pytest.raises(InputError, match=r"would write .*/d/a/\.1\.png\.partial, which"):
        check_outputs_spare_inputs(d, find_inputs(str(listed)), lambda _: ["a/1.png"], [])


def test_checkpoint_is_a_run_file(tmp_path):
    d, out = tmp_path / "d", tmp_path / "out"
    touch(d / "1.jpg")
    ckpt = out / "predictions.json"
    with pytest.raises(InputError) as err:
        check_outputs_spare_inputs(out, find_inputs(str(d)), pictures, RUN_FILES, [None, str(ckpt)])
    assert str(err.value) == (
        f"output={out}: predict would write {ckpt}, which is the input {ckpt}: "
        "choose another output= folder"
    )
    # gt= where an image's picture goes
    with pytest.raises(InputError, match=r"which is the input .*/out/1_overlay\.jpg: choose"):
        check_outputs_spare_inputs(
            out, find_inputs(str(d)), pictures, RUN_FILES, [out / "1_overlay.jpg"]
        )


def test_input_folder_inside_output_folder(tmp_path):
    photos = tmp_path / "photos"
    touch(photos / "1.jpg")
    inputs = find_inputs(str(photos))
    check_outputs_spare_inputs(tmp_path, inputs, pictures, RUN_FILES)
    with pytest.raises(InputError, match=r"which is the input .*/photos/1\.jpg: choose"):
        check_outputs_spare_inputs(tmp_path, inputs, pictures, ["photos/1.jpg"])
