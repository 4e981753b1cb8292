"""Broken and foreign model folders (``model.safetensors`` + ``config.json``): one
``CheckpointError`` line naming the file, from ``read_checkpoint``, ``from_pretrained`` and a
command line; nothing in the folder is unpickled."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli_config, write_tiny_checkpoint
from entityseg import CheckpointError, EntitySegmenter
from entityseg.models.checkpoint import read_checkpoint
from entityseg.models.pretrained import CONFIG_FILE, FORMAT_VERSION, MODEL_FILE


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    segmenter = EntitySegmenter.from_checkpoint(write_tiny_checkpoint(folder / "t.ckpt"))
    return segmenter.save_pretrained(folder / "model")


def broken(good, tmp_path, name: str):
    """A copy of the good folder, broken as ``name`` says; the problem it must report."""
    folder = tmp_path / name
    shutil.copytree(good, folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    weights = folder / MODEL_FILE
    if name == "cut_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return folder, f"{weights}: not a readable safetensors file"
    if name == "pickle_weights":  # a pickle under the safetensors name is never unpickled
        weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
        return folder, f"{weights}: not a readable safetensors file"
    if name == "no_weights":
        weights.unlink()
        return folder, f"{weights}: not found"
    if name == "not_json":
        (folder / CONFIG_FILE).write_text("{network: ")
        return folder, f"{folder / CONFIG_FILE}: not valid json"
    if name == "transformers_config":  # another library's model folder
        (folder / CONFIG_FILE).write_text(json.dumps({"model_type": "mask2former"}))
        return folder, "not an entityseg model config"
    if name == "newer_format":
        config["format_version"] = FORMAT_VERSION + 1
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        return folder, "upgrade entityseg"
    if name == "other_network":
        config["network"]["decoder"]["num_queries"] = 3
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        return folder, "does not fit this network"
    raise ValueError(name)


CASES = [
    "cut_weights",
    "pickle_weights",
    "no_weights",
    "not_json",
    "transformers_config",
    "newer_format",
    "other_network",
]


@pytest.mark.parametrize("name", CASES)
def test_a_broken_model_folder_is_one_line(good, tmp_path, name):
    folder, problem = broken(good, tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        EntitySegmenter.from_pretrained(folder)
    assert problem in str(info.value) and "\n" not in str(info.value)
    if name != "other_network":  # read fine, only the weights do not fit
        with pytest.raises(CheckpointError):
            read_checkpoint(folder)


def test_predict_and_fine_tuning_name_the_broken_folder(good, tmp_path):
    from entityseg import predict, train

    folder, problem = broken(good, tmp_path, "cut_weights")
    (tmp_path / "photo.png").write_bytes(b"")  # never read: the model stops predict first
    out = tmp_path / "out"
    cfg = cli_config("predict", out, f"ckpt_path={folder}", f"input={tmp_path}/photo.png")
    with pytest.raises(SystemExit) as stop:
        predict.main(cfg)
    assert str(stop.value).startswith(f"ckpt_path={folder}: {problem}")
    with pytest.raises(SystemExit) as stop:
        train.main(cli_config("train", out, f"model.init_from={folder}"))
    assert str(stop.value).startswith(f"config error: model.init_from={str(folder)!r}: {problem}")
