"""Crafted and broken checkpoints through every entry point that opens one: one
``CheckpointError`` line naming the file, and nothing in the file ever runs."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch
from crafted import exec_payload, scene

from conftest import cli_config, run_python, write_tiny_checkpoint
from entityseg import CheckpointError, EntitySegmenter
from entityseg.models.checkpoint import read_checkpoint

READ_ONLY = (
    "a checkpoint holds only tensors, numbers, strings and containers (nothing in it was run)"
)


def crafted_checkpoints(folder, marker) -> dict:
    """File -> the problem ``read_checkpoint`` reports: payloads in torch's zip format and as a
    legacy pickle, a truncated ``data.pkl``, and files that are no checkpoint at all."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {}, "hyper_parameters": exec_payload(marker)}
    torch.save(payload, folder / "zip_payload.ckpt")
    (folder / "legacy_payload.ckpt").write_bytes(pickle.dumps(payload, protocol=2))
    good = write_tiny_checkpoint(folder / "good.ckpt")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(folder / "cut_pickle.ckpt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item, data[: len(data) // 2] if item.filename.endswith("data.pkl") else data
            )
    (folder / "cut_zip.ckpt").write_bytes(good.read_bytes()[:5000])
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    (folder / "list.ckpt").write_bytes(buffer.getvalue())
    refused = f"refused to load: it asks the unpickler for exec, and {READ_ONLY}"
    return {
        folder / "zip_payload.ckpt": refused,
        folder / "legacy_payload.ckpt": refused,
        folder / "cut_pickle.ckpt": "not a checkpoint (torch.load: ",
        folder / "cut_zip.ckpt": "not a checkpoint (torch.load: ",
        folder / "empty.ckpt": "not a checkpoint (torch.load: ",
        folder / "notes.ckpt": "not a checkpoint (torch.load: ",
        folder / "list.ckpt": "not a checkpoint (a list)",
    }


@pytest.fixture()
def crafted(tmp_path):
    marker = tmp_path / "payload_ran"
    return crafted_checkpoints(tmp_path / "checkpoints", marker), marker


def test_read_checkpoint_refuses_each_in_one_line_and_runs_nothing(crafted):
    files, marker = crafted
    for path, problem in files.items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert str(err.value).startswith(f"{path}: {problem}"), str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_the_api_refuses_a_crafted_checkpoint(crafted):
    files, marker = crafted
    for path in files:
        with pytest.raises(CheckpointError, match="^" + str(path)):
            EntitySegmenter.from_checkpoint(path)
    assert not marker.exists()


def test_every_entry_point_stops_in_one_line_on_a_crafted_checkpoint(crafted, tmp_path):
    """predict, evaluate, export, the web app, and train's model.init_from= and ckpt_path=
    (a resume), each called as its command line calls it."""
    from entityseg import evaluate, export, predict, train
    from entityseg.app import __main__ as app

    files, marker = crafted
    evil, out = tmp_path / "checkpoints" / "zip_payload.ckpt", tmp_path / "out"
    problem = f"{evil}: {files[evil]}"
    (tmp_path / "photo.png").write_bytes(b"")  # never read: the checkpoint stops predict first
    entry_points = {
        "predict": (
            predict.main,
            cli_config("predict", out, f"ckpt_path={evil}", f"input={tmp_path}/photo.png"),
            f"ckpt_path={evil}: {problem}",
        ),
        "evaluate": (
            evaluate.main,
            cli_config("eval", out, f"ckpt_path={evil}"),
            f"ckpt_path={evil}: {problem}",
        ),
        "export": (
            export.main,
            cli_config("export", out, f"ckpt_path={evil}"),
            f"ckpt_path={evil}: {problem}",
        ),
        "app": (
            app.main,
            cli_config("app", out, f"ckpt_path={evil}"),
            f"ckpt_path={evil}: {problem}",
        ),
        "train init_from": (
            train.main,
            cli_config("train", out, f"model.init_from={evil}"),
            f"config error: model.init_from={str(evil)!r}: {problem}",
        ),
        "train resume": (
            train.main,
            cli_config("train", out, f"ckpt_path={evil}"),
            f"config error: ckpt_path={str(evil)!r}: {problem}",
        ),
    }
    for name, (entry, cfg, message) in entry_points.items():
        with pytest.raises(SystemExit) as stop:
            entry(cfg)
        assert str(stop.value) == message, name
    assert not marker.exists()


def test_the_command_line_exits_in_one_line_on_a_crafted_checkpoint(crafted, tmp_path):
    files, marker = crafted
    evil = tmp_path / "checkpoints" / "legacy_payload.ckpt"
    scene(48, 64).save(tmp_path / "photo.png")
    result = run_python(
        "-m",
        "entityseg.predict",
        f"ckpt_path={evil}",
        f"input={tmp_path / 'photo.png'}",
        f"output={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"ckpt_path={evil}: {evil}: {files[evil]}"
    assert not marker.exists()
