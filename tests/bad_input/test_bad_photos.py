"""Bad photos among good ones: predict names and skips each, evaluate stops at the first in one
line, the API raises one clear error, and no output is ever written over an input."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from crafted import scene, write_bad_photos, write_odd_photos
from PIL import Image

from conftest import cli_config, run_python, write_tiny_checkpoint
from entityseg import EntitySegmenter
from entityseg import predict as predict_cli
from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.data.views import EntityViewsDataset, ViewConfig
from entityseg.inference.shards import Recorded, file_identity, is_done
from entityseg.inference.writing import picture_paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def predict(checkpoint, input, output, *overrides):
    return run_python(
        "-m",
        "entityseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={input}",
        f"output={output}",
        f"hydra.run.dir={output}_hydra",
        *overrides,
    )


@pytest.fixture(scope="module")
def corpus(checkpoint, tmp_path_factory):
    """One predict run over a folder of bad photos among odd but good ones: (folder, bad photo
    -> problem, good photo names, output folder, the finished process, the payload's marker)."""
    root = tmp_path_factory.mktemp("corpus")
    marker = root / "payload_ran"
    bad = write_bad_photos(root / "photos", marker)
    good = [name for name in write_odd_photos(root / "photos") if name not in bad]
    result = predict(checkpoint, root / "photos", root / "out")
    return root / "photos", bad, good, root / "out", result, marker


def test_predict_skips_each_bad_photo_by_name_and_predicts_the_others(corpus):
    photos, bad, good, out, result, marker = corpus
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    log = result.stdout + result.stderr
    for name, problem in bad.items():
        assert f"skipped: {photos / name}: {problem}" in log
    names = ", ".join(str(photos / name) for name in sorted(bad))
    assert result.stderr.strip().splitlines()[-1] == (
        f"{len(bad)} of {len(bad) + len(good)} image(s) skipped, each for the reason logged "
        f"above (the others were predicted; a rerun tries the skipped again): {names}"
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == set(good)
    for name in good:  # every mode and format read, the 6 x 2000 strip too, at full size
        id_map = np.asarray(Image.open(picture_paths(out, name.rsplit(".", 1)[0])[0]))
        assert id_map.shape == read_rgb_image(photos / name).shape[:2]
    assert not marker.exists()


def test_the_api_raises_one_line_naming_each_bad_photo(corpus, checkpoint):
    photos, bad, *_, marker = corpus
    segmenter = EntitySegmenter.from_checkpoint(checkpoint)
    for name, problem in bad.items():
        with pytest.raises((EntityDataError, ValueError)) as err:
            segmenter(photos / name)
        message = str(err.value)
        assert "\n" not in message
        if isinstance(err.value, EntityDataError):
            assert message.startswith(f"{photos / name}: {problem}")
        else:  # an array or a path read fine but too small: the one size check
            assert message == problem
    with pytest.raises(ValueError, match="^image of 2x3 pixels is too small to segment"):
        segmenter(np.zeros((3, 2, 3), np.uint8))
    assert not marker.exists()


def test_evaluate_stops_at_a_bad_photo_in_one_line_without_a_training_set(checkpoint, tmp_path):
    """A PostScript "photo" in the validation set, read by DataLoader workers: one line naming
    it, no traceback, nothing run; data.train_json need not exist for evaluate."""
    images = tmp_path / "images"
    images.mkdir()
    marker = tmp_path / "payload_ran"
    write_bad_photos(tmp_path / "bad", marker)
    (images / "photo.jpg").write_bytes((tmp_path / "bad" / "script.jpg").read_bytes())
    scene(48, 64).save(images / "good.jpg")
    gt = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "height": 48, "width": 64},
            {"id": 2, "file_name": "photo.jpg", "height": 10, "width": 10},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "entity"}],
    }
    (tmp_path / "val.json").write_text(json.dumps(gt))
    result = run_python(
        "-m",
        "entityseg.evaluate",
        f"ckpt_path={checkpoint}",
        "data.synthetic=null",
        f"data.val_json={tmp_path / 'val.json'}",
        f"data.val_images={images}",
        f"data.train_json={tmp_path / 'no_such.json'}",
        f"data.train_images={tmp_path / 'no_such_folder'}",
        "data.num_workers=2",
        "data.persistent_workers=false",
        "inference.modes=[image_o]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"evaluation stopped: {images / 'photo.jpg'}: not an image file (entityseg reads "
        "JPEG, PNG, BMP, TIFF, WEBP, GIF)"
    )
    assert not marker.exists()
    assert not (tmp_path / "no_such.json").exists()  # no training set generated either


def test_a_too_small_photo_is_one_line_from_a_dataloader_worker(tmp_path):
    from entityseg.data.coco_entity import EntityImage

    scene(2, 30).save(tmp_path / "thin.png")
    record = EntityImage(tmp_path / "x.json", 1, tmp_path / "thin.png", 2, 30, (), 0)
    views = ViewConfig((96,), 160, "fixed4", 0.7, 0.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    loader = torch.utils.data.DataLoader(
        EntityViewsDataset([record], views, train=False), num_workers=1, collate_fn=list
    )
    with pytest.raises(EntityDataError) as err:
        next(iter(loader))
    assert str(err.value) == (
        f"{tmp_path / 'thin.png'}: image of 30x2 pixels is too small to segment (both sides "
        "must be at least 4 pixels)"
    )


def predict_here(checkpoint, input, output):
    """``python -m entityseg.predict`` with these arguments, called in this process."""
    config = cli_config(
        "predict", output, f"ckpt_path={checkpoint}", f"input={input}", f"output={output}"
    )
    predict_cli.main(config)


def test_predict_refuses_to_write_over_its_input(checkpoint, tmp_path):
    """Outputs are named so that a photo is never one (``photo.png`` gives
    ``photo_entities.png``), but a folder may hold a photo named as another's output."""
    scene(48, 64).save(tmp_path / "photo.png")
    overlay = tmp_path / "photo_overlay.jpg"  # what predicting photo.png into here would write
    scene(48, 64, seed=2).save(overlay)
    before = overlay.read_bytes()
    with pytest.raises(SystemExit) as stop:
        predict_here(checkpoint, tmp_path, tmp_path)
    assert str(stop.value) == (
        f"output={tmp_path}: predict would write {overlay}, which is the input {overlay}: "
        "choose another output= folder"
    )
    assert overlay.read_bytes() == before
    assert not list(tmp_path.glob("predictions*"))


def test_resume_redoes_a_photo_of_the_same_name_from_another_folder(checkpoint, tmp_path, caplog):
    for folder, seed in (("a", 1), ("c", 2)):
        (tmp_path / folder).mkdir()
        scene(48, 64, seed=seed).save(tmp_path / folder / "ok.png")
    out = tmp_path / "out"
    predict_here(checkpoint, tmp_path / "a", out)
    with caplog.at_level(logging.INFO, logger="entityseg"):
        predict_here(checkpoint, tmp_path / "c", out)
    assert "0 of 1 images already done" in caplog.text
    *_, last = (out / "predictions.rank0.jsonl").read_text().splitlines()
    assert json.loads(last)["source"] == file_identity(tmp_path / "c" / "ok.png")
    entities = EntitySegmenter.from_checkpoint(checkpoint)(tmp_path / "c" / "ok.png")
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == [{**r, "file_name": "ok.png"} for r in entities.to_coco(1)]


def test_a_record_is_done_only_for_the_same_file_unchanged(tmp_path):
    photo, out = tmp_path / "ok.png", tmp_path / "out"
    scene(8, 8).save(photo)
    out.mkdir()
    shard = out / "predictions.rank0.jsonl"
    record = Recorded(shard, offset=0, time=0.0, image_id=1, source=file_identity(photo))
    pictures = picture_paths(out, "ok")
    assert not is_done(record, photo, pictures)  # no pictures yet
    for picture in pictures:
        picture.write_bytes(b"x")
    assert is_done(record, photo, pictures)
    skipped = Recorded(shard, 0, 1.0, source=file_identity(photo), skipped="unreadable")
    assert not is_done(skipped, photo, pictures)  # its latest line says it was skipped
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # edited since
    assert not is_done(record, photo, pictures)
    assert not is_done(Recorded(shard, 0, 0.0, 1, None), photo, pictures)  # an older predict
