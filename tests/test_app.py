"""The web demo (``entityseg.app``) through Gradio's own test client, against a served page.

Every upload goes through the HTTP API that the page's button calls. The downloads are compared
with what ``python -m entityseg.predict`` writes for the same photos and settings, and the
entities of each mode with the Python API's.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from omegaconf import OmegaConf
from PIL import Image

from conftest import (
    PHOTOS,
    run_python,
    tiny_model,
    write_awkward_photos,
    write_tiny_checkpoint,
)
from entityseg.api import EntitySegmenter
from entityseg.app.__main__ import check_app_settings, how_to_get_a_checkpoint, serve
from entityseg.app.page import build_page
from entityseg.app.service import (
    SegmentationService,
    UploadError,
    read_upload,
)
from entityseg.config import ConfigError
from entityseg.inference.compare import compare_entities

#: The served page refuses uploads above this (the photos are at most 128 x 96 = 0.0123 MP).
MAX_MEGAPIXELS = 0.015
APP = dict(
    host="127.0.0.1",
    port=0,
    max_megapixels=MAX_MEGAPIXELS,
    max_file_mb=5,
    examples=1,
    keep_results=8,
    display_side=64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_awkward_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> EntitySegmenter:
    return EntitySegmenter.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(segmenter, photos, tmp_path_factory):
    """Gradio's client of the page, served on a free port for this module."""
    workdir = tmp_path_factory.mktemp("results")
    service = SegmentationService(
        segmenter, workdir, MAX_MEGAPIXELS, APP["keep_results"], APP["display_side"]
    )
    page = build_page(service, [photos / "rgb.jpg"], "tiny test network")
    _, url, _ = serve(page, OmegaConf.create(APP), [photos / "rgb.jpg"], workdir, block=False)
    yield Client(url, verbose=False)
    page.close()


def segment(client: Client, path: Path, mode="batch_oc", layout="fixed4", delta=0.7, **kwargs):
    """The page's button: (input picture, overlay, summary, comparison, download paths)."""
    choices = {"overlapping": False, "score_threshold": 0.0, "compare": False, **kwargs}
    return client.predict(
        handle_file(str(path)),
        mode,
        layout,
        delta,
        choices["overlapping"],
        choices["score_threshold"],
        choices["compare"],
        api_name="/segment",
    )


def downloads_of(outputs) -> dict[str, Path]:
    """The download files by name."""
    files = [Path(f if isinstance(f, str) else f["path"]) for f in outputs[4]]
    return {f.name: f for f in files}


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_downloads_are_what_predict_writes(client, checkpoint, segmenter, photos, tmp_path):
    """The same photos and settings (fixed8, delta 0.6, a score threshold that drops entities):
    the app's 16-bit PNG and overlay JPEG are predict's byte for byte, its COCO records are
    predict's (image id 1: one image)."""
    scores = segmenter.replace(test_crop_layout="fixed8", crop_delta=0.6)(photos / "rgb.jpg")
    threshold = round(float(scores.scores.median()), 4)  # keeps some entities, drops others
    out = tmp_path / "predicted"
    result = run_python(
        "-m",
        "entityseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={photos}/*.*g",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/hydra",
        "data.test_crop_layout=fixed8",
        "data.crop_delta=0.6",
        f"inference.score_threshold={threshold}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = records(out / "predictions.json")
    dropped = 0
    for name in PHOTOS:
        stem = Path(name).stem
        outputs = segment(
            client, photos / name, "batch_oc", "fixed8", 0.6, score_threshold=threshold
        )
        files = downloads_of(outputs)
        assert sorted(files) == sorted(
            [f"{stem}_entities.png", f"{stem}_overlay.jpg", f"{stem}_predictions.json"]
        )
        assert (
            files[f"{stem}_entities.png"].read_bytes()
            == (out / f"{stem}_entities.png").read_bytes()
        )
        assert (
            files[f"{stem}_overlay.jpg"].read_bytes() == (out / f"{stem}_overlay.jpg").read_bytes()
        )
        app_records = records(files[f"{stem}_predictions.json"])
        expected = [r for r in predicted if r["file_name"] == name]
        assert {r["image_id"] for r in app_records} <= {1}
        assert [{**r, "image_id": 0} for r in app_records] == [
            {**r, "image_id": 0} for r in expected
        ]
        assert all(r["score"] >= threshold for r in app_records)
        assert outputs[2].startswith(f"**{len(app_records)} entities (Batch-OC)")
        id_map = np.asarray(Image.open(files[f"{stem}_entities.png"]))
        assert id_map.dtype == np.uint16 and id_map.max() == len(app_records)
        dropped += len(
            segmenter.replace(test_crop_layout="fixed8", crop_delta=0.6)(photos / name)
        ) - len(app_records)
    assert dropped > 0  # the threshold took effect


@pytest.mark.parametrize("mode", ["image_o", "batch_o", "batch_c", "batch_oc"])
def test_each_mode_gives_the_api_entities(client, segmenter, photos, mode):
    path = photos / "rotated.jpg"
    outputs = segment(client, path, mode, overlapping=True)
    expected = segmenter.replace(overlapping=True)(path, mode).to_coco(1)
    app_records = records(downloads_of(outputs)[f"{path.stem}_predictions.json"])
    assert [{k: r[k] for k in ("segmentation", "score")} for r in app_records] == [
        {k: r[k] for k in ("segmentation", "score")} for r in expected
    ]
    picture = np.asarray(Image.open(outputs[1]))  # the overlay, at the page's size
    assert max(picture.shape[:2]) == APP["display_side"]
    assert outputs[3] == {"__type__": "update", "visible": False, "value": None}  # not asked


def test_comparison_shows_what_the_crops_recovered(client, segmenter, photos):
    path = photos / "rgb.jpg"
    outputs = segment(client, path, "batch_o", compare=True)
    image_o, batch_oc = segmenter(path, "image_o"), segmenter(path, "batch_oc")
    counts = compare_entities(batch_oc, image_o).counts()  # tests/inference/test_compare.py
    assert (
        f"Image-O finds {len(image_o)}; Batch-OC recovers {counts['recovered']} (mostly outside "
        f"every Image-O entity), merges {counts['merged']} and splits {counts['split']}"
    ) in outputs[2]
    assert outputs[2].startswith(f"**{len(segmenter(path, 'batch_o'))} entities (Batch-O)")
    assert outputs[3]["visible"] is True
    comparison = np.asarray(Image.open(outputs[3]["value"]))
    assert comparison.shape[1] > comparison.shape[0]  # two panels side by side


def test_bad_uploads_are_one_line_messages(client, photos, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((photos / "rgb.jpg").read_bytes()[:400])
    large = tmp_path / "large.png"
    Image.new("RGB", (200, 100)).save(large)
    expected = {
        text: "notes.jpg: not an image file (entityseg reads JPEG, PNG, BMP, TIFF, WEBP, GIF)",
        empty: "empty.png: image file is empty (0 bytes)",
        large: "large.png: 200x100 is 0.02 megapixels, above this demo's limit of 0.015 "
        "(app.max_megapixels)",
    }
    for path, message in expected.items():
        with pytest.raises(AppError) as caught:
            segment(client, path)
        assert str(caught.value) == message
    with pytest.raises(AppError) as caught:
        segment(client, truncated)
    message = str(caught.value)
    assert message.startswith("truncated.jpg: corrupt image (") and "\n" not in message
    assert str(tmp_path) not in message  # the server's paths stay on the server
    with pytest.raises(AppError) as caught:  # the page's own range check
        segment(client, photos / "rgb.jpg", delta=1.5)
    assert str(caught.value) == "Value 1.5 is greater than maximum value 1.0."


def test_bad_choices_are_config_errors(segmenter, photos, tmp_path):
    service = SegmentationService(segmenter, tmp_path)
    for choice, key in [
        ({"crop_delta": 1.5}, "data.crop_delta"),
        ({"mode": "x"}, "inference.mode"),
    ]:
        with pytest.raises(ConfigError, match=f"^{key}="):
            service.segment(photos / "rgb.jpg", replace(service.defaults, **choice))


def test_page_offers_what_the_network_and_compat_can_do(segmenter, tmp_path):
    def overlapping_checkbox(service):
        page = build_page(service)
        (checkbox,) = [
            c for c in page.config["components"] if c["props"].get("elem_id") == "overlapping"
        ]
        return checkbox["props"]

    assert overlapping_checkbox(SegmentationService(segmenter, tmp_path))["interactive"] is True
    release = SegmentationService(segmenter.replace(compat="release"), tmp_path)
    assert not release.can_overlap and overlapping_checkbox(release)["interactive"] is False
    assert SegmentationService(segmenter, tmp_path).modes == [
        "image_o",
        "batch_o",
        "batch_c",
        "batch_oc",
    ]
    mask2former = EntitySegmenter(tiny_model(enabled=False), segmenter.views, device="cpu")
    assert SegmentationService(mask2former, tmp_path).modes == ["image_o"]  # no batch decoder


def test_read_upload_reads_as_predict_reads(photos):
    from entityseg.data.coco_entity import read_rgb_image

    for name in PHOTOS:
        assert np.array_equal(read_upload(photos / name, 1), read_rgb_image(photos / name))
    with pytest.raises(UploadError, match=r"^rgb.jpg: 128x96 is 0.0123 megapixels, above"):
        read_upload(photos / "rgb.jpg", 0.01)


def test_app_settings_are_checked():
    check_app_settings(OmegaConf.create(APP))
    for key, value in [("port", 70000), ("max_megapixels", 0), ("examples", -1), ("port", "x")]:
        with pytest.raises(ConfigError, match=f"^app.{key}="):
            check_app_settings(OmegaConf.create({**APP, key: value}))


def test_without_a_checkpoint_it_says_how_to_get_one(tmp_path):
    message = how_to_get_a_checkpoint(tmp_path)
    assert "make demo" in message and "ckpt_path=cropformer_swin_tiny_3x" in message
    older = tmp_path / "demo/runs/1/checkpoints/last.ckpt"
    newer = tmp_path / "demo/runs/2/checkpoints/best.ckpt"
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    import os

    os.utime(older, (1, 1))
    assert f"ckpt_path={newer}" in how_to_get_a_checkpoint(tmp_path)


def test_command_line_errors_are_one_line(tmp_path):
    for overrides, expected in [
        (["app.port=70000"], "app.port=70000: must be a port number"),
        ([f"ckpt_path={tmp_path}/missing.ckpt"], f"ckpt_path={tmp_path}/missing.ckpt:"),
    ]:
        result = run_python(
            "-m", "entityseg.app", f"hydra.run.dir={tmp_path}/hydra", *overrides, timeout=120
        )
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert expected in last and "Traceback" not in result.stderr
