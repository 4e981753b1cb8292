"""Untrusted release files (issue #21): a crafted checkpoint runs no code, a damaged checkpoint
or config fails in one line naming it, and a failed conversion leaves no half-written file."""

import collections
import errno
import logging
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from crafted import exec_payload, system_payload

from conftest import run_python
from entityseg.api import EntitySegmenter
from entityseg.interop.release import (
    ReleaseConversionError,
    convert_release,
    load_release_config,
    read_release_weights,
)

PKL_REFUSAL = "a detectron2 .pkl holds only numpy arrays, dicts, lists and scalars"
PTH_REFUSAL = "a release .pth holds only tensors, dicts, lists and numbers"


def one_line_error(call, *args) -> str:
    with pytest.raises(ReleaseConversionError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- .pkl


@pytest.mark.parametrize(
    "payload, protocol, refused",
    [(system_payload, 2, "posix.system"), (exec_payload, 4, "builtins.exec")],
)
def test_a_pkl_that_would_run_code_is_refused_in_one_line(tmp_path, payload, protocol, refused):
    marker, path = tmp_path / "marker", tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": payload(marker)}}, protocol=protocol))
    message = one_line_error(read_release_weights, path)
    assert message == f"{path}: refused to unpickle {refused}: {PKL_REFUSAL}"
    assert not marker.exists()


def detectron2_state() -> dict:
    """A detectron2 model-zoo ``.pkl``'s content: numpy arrays of several dtypes and layouts in an
    OrderedDict, numpy scalars beside them, and the file's own keys."""
    model = collections.OrderedDict(
        [
            ("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
            ("a.bias", np.asfortranarray(np.arange(6, dtype=np.float64).reshape(3, 2))),
            ("b.index", np.array([3, 1, 2], dtype=np.int64)),
            ("b.half", np.linspace(0, 1, 4, dtype=np.float16)),
            ("b.step", np.float32(2.5)),  # scalars are no tensors: read and left out
            ("b.count", np.int64(7)),
        ]
    )
    return {"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy 1.x"])
def test_a_detectron2_pkl_still_reads_back_exactly(tmp_path, protocol):
    """Guards the allow-list against being too narrow (this passed before the fix too)."""
    content = detectron2_state()
    if protocol == "numpy 1.x":  # numpy < 2 names its pickle functions numpy.core.*
        data = pickle.dumps(content, protocol=2).replace(b"numpy._core.", b"numpy.core.")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    else:
        data = pickle.dumps(content, protocol=protocol)
    path = tmp_path / "model_final.pkl"
    path.write_bytes(data)
    tensors = read_release_weights(path)
    arrays = {k: v for k, v in content["model"].items() if isinstance(v, np.ndarray)}
    assert list(tensors) == list(arrays)
    for key, array in arrays.items():
        assert torch.equal(tensors[key], torch.from_numpy(np.ascontiguousarray(array))), key


def legit_pkl_bytes() -> bytes:
    return pickle.dumps(detectron2_state(), protocol=2)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file, not a checkpoint"),
        (legit_pkl_bytes()[:10], "not a readable .pkl (pickle data was truncated)"),
        (legit_pkl_bytes()[:-1], "not a readable .pkl (Ran out of input)"),
        (b"not a pickle", "not a readable .pkl (invalid load key, 'n')"),
    ],
    ids=["empty", "cut early", "cut late", "garbage"],
)
def test_a_damaged_pkl_fails_in_one_line(tmp_path, content, reason):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(content)
    assert one_line_error(read_release_weights, path) == f"{path}: {reason}"


# --------------------------------------------------------------------------- .pth


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pth_that_would_run_code_is_refused_in_one_line(tmp_path, writer):
    """torch.load(weights_only=True) refuses it; its many-line advice (to load it unsafely)
    becomes one line."""
    marker, path = tmp_path / "marker", tmp_path / "model_final.pth"
    content = {"model": {"x": system_payload(marker)}}
    if writer == "torch.save":  # the zip format
        torch.save(content, path)
    else:  # the legacy format torch.load falls back to for a file that is no zip
        path.write_bytes(pickle.dumps(content, protocol=2))
    message = one_line_error(read_release_weights, path)
    assert message == f"{path}: refused to unpickle posix.system: {PTH_REFUSAL}"
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [b"", b"garbage, not a checkpoint", b"PK\x03\x04 a cut zip"], ids=str
)
def test_a_damaged_pth_fails_in_one_line(tmp_path, content):
    path = tmp_path / "model_final.pth"
    path.write_bytes(content)
    message = one_line_error(read_release_weights, path)
    if content:  # the reason is torch.load's first line, without its advice
        pattern = re.escape(f"{path}: not a readable PyTorch checkpoint (") + r"[^()]+\)"
        assert re.fullmatch(pattern, message), message
        assert "weights_only" not in message
    else:
        assert message == f"{path}: empty file, not a checkpoint"


# --------------------------------------------------------------------------- the CLI


def test_convert_cli_refuses_a_code_running_pkl_in_one_line(tmp_path, shared_data):
    marker, path = tmp_path / "marker", tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": system_payload(marker)}}, protocol=2))
    config = shared_data / "official_reference" / "cropformer_tiny" / "config.yaml"
    out = tmp_path / "out.ckpt"
    result = run_python("-m", "entityseg.convert_release", path, config, out, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path}: refused to unpickle posix.system: {PKL_REFUSAL}"
    )
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not out.exists()


# --------------------------------------------------------------------------- config yaml


def write_yaml(folder: Path, **files: str) -> None:
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)


@pytest.mark.parametrize(
    "files, reason",
    [
        (
            {"a": "MODEL: [1, 2\n"},
            "not valid yaml (expected ',' or ']', but got '<stream end>' at line 2, column 1)",
        ),
        ({"a": "- MODEL\n- INPUT\n"}, "the top level is a list, not a mapping of config keys"),
        ({"a": "_BASE_: b.yaml\n", "b": "_BASE_: a.yaml\n"}, None),  # the loop, named below
        ({"a": "_BASE_: a.yaml\nMODEL: {}\n"}, "_BASE_ loop a.yaml -> a.yaml"),
        ({"a": "_BASE_: Base-missing.yaml\n"}, None),
    ],
    ids=["unparsable", "a list", "a loop", "a self-loop", "a missing base"],
)
def test_a_broken_config_fails_in_one_line(tmp_path, files, reason):
    write_yaml(tmp_path, **files)
    path = tmp_path / "a.yaml"
    message = one_line_error(load_release_config, path)
    if "b" in files:  # the error names the file that closes the loop
        assert message == f"{tmp_path / 'b.yaml'}: _BASE_ loop a.yaml -> b.yaml -> a.yaml"
    elif "missing" in files["a"]:
        missing = tmp_path / "Base-missing.yaml"
        assert message == f"{path}: _BASE_ Base-missing.yaml not found ({missing})"
    else:
        assert message == f"{path}: {reason}"


# --------------------------------------------------------------------------- writing


def test_a_failed_conversion_leaves_the_previous_output_as_it_was(
    tmp_path, shared_data, monkeypatch
):
    folder = shared_data / "official_reference" / "cropformer_tiny"
    out = tmp_path / "out" / "converted.ckpt"
    out.parent.mkdir()
    out.write_bytes(b"the previous checkpoint")

    def full_disk(obj, f):  # writes a part, then fails as a full disk does
        with open(f, "wb") if isinstance(f, str | Path) else f as stream:
            stream.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        convert_release(folder / "model_final.pth", folder / "config.yaml", out)
    assert out.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file


# --------------------------------------------------------------------------- .pt2


def write_zip_without_a_program(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cropformer/notes.txt", "not a program")


@pytest.mark.parametrize(
    "write, reason",
    [
        (
            lambda path: path.write_bytes(b"garbage, not an exported program"),
            "File is not a zip file",
        ),
        (write_zip_without_a_program, None),  # the reason: torch.export.load's own words
    ],
    ids=["garbage", "a zip"],
)
def test_a_pt2_that_does_not_load_fails_in_one_line_after_a_warning(
    tmp_path, caplog, write, reason
):
    path = tmp_path / "cropformer.pt2"
    write(path)
    with caplog.at_level(logging.WARNING, logger="entityseg"), pytest.raises(ValueError) as err:
        EntitySegmenter.from_torch_export(path)
    message = str(err.value)
    assert "\n" not in message
    if reason:
        assert message == f"{path}: not a torch.export .pt2 ({reason})"
    else:
        assert re.fullmatch(re.escape(f"{path}: not a torch.export .pt2 (") + r"[^()]+\)", message)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("entityseg")]
    assert warnings == [
        f"{path}: loading a .pt2 may run code stored in it; open only files from a source you "
        "trust (ONNX, EntitySegmenter.from_onnx, is the safe exchange format)"
    ]
