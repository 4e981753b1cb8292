"""EntitySegmenter: the Python API, and predict / evaluate, which infer through it.

One tiny CropFormer is trained for one step with test views that are not the data config's
defaults (fixed8 crops, delta 0.6, short side 80), so that every test can tell whether the
views came from the checkpoint.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import PHOTOS, run_python, write_awkward_photos
from entityseg import CheckpointError, Entities, EntitySegmenter
from entityseg.config import ConfigError
from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.data.views import ViewConfig
from entityseg.interop.release import convert_release
from entityseg.models.checkpoint import INFERENCE_KEY, NET_CONFIG_KEY, VIEWS_KEY, read_checkpoint

#: The trained checkpoint's test views: none of them the synthetic data config's.
VIEWS = ["data.test_crop_layout=fixed8", "data.crop_delta=0.6", "data.test_short_size=500"]
SHORT_SIDE = 80  # 500 x data.size_scale 0.16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(last.ckpt of a one-step training run with :data:`VIEWS`, its folder)."""
    from entityseg.training import train
    from test_train import config

    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = config(
        tmp_path,
        *VIEWS,
        "trainer.max_steps=1",
        "trainer.check_val_every_n_epoch=100",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "test=false",
    )
    train(cfg)
    return tmp_path / "run/checkpoints/last.ckpt", tmp_path


@pytest.fixture(scope="module")
def segmenter(trained):
    return EntitySegmenter.from_checkpoint(trained[0], device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photos of different sizes in awkward encodings (:data:`PHOTOS`)."""
    return write_awkward_photos(tmp_path_factory.mktemp("photos"))


def predict(checkpoint, images, out, tmp_path, *overrides):
    result = run_python(
        "-m",
        "entityseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={images}",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/hydra",
        *overrides,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = (out / "predictions.rank0.jsonl").read_text().splitlines()[0]
    return json.loads((out / "predictions.json").read_text()), json.loads(header)["settings"]


def records_of(predictions: list[dict], file_name: str) -> list[dict]:
    return [
        {k: v for k, v in p.items() if k != "file_name"}
        for p in predictions
        if p["file_name"] == file_name
    ]


@pytest.fixture(scope="module")
def predicted(trained, photos, tmp_path_factory):
    """``predict ckpt_path=<trained>`` on :data:`PHOTOS` without ``experiment=``: (its
    predictions.json, its recorded settings, its output folder)."""
    tmp_path = tmp_path_factory.mktemp("predicted")
    out = tmp_path / "out"
    images = f"{photos}/*.*g"  # the photos, not the scenes folder
    return (*predict(trained[0], images, out, tmp_path), out)


def test_training_checkpoint_stores_its_test_views(trained, segmenter):
    stored = read_checkpoint(trained[0])[VIEWS_KEY]
    assert stored["test_crop_layout"] == "fixed8" and stored["crop_delta"] == 0.6
    assert (stored["test_short_size"], stored["size_scale"]) == (500, 0.16)  # as configured
    assert ViewConfig.from_keys(stored) == segmenter.views
    views = segmenter.views
    assert views.short_sizes == (SHORT_SIDE,)
    assert (views.crop_layout, views.crop_delta) == ("fixed8", 0.6)
    assert (segmenter.settings.compat, segmenter.settings.mode) == ("entityseg", "batch_oc")
    assert read_checkpoint(trained[0])[INFERENCE_KEY]["compat"] is None  # left to the file


@pytest.fixture(scope="module")
def listed(segmenter, photos) -> dict:
    """File name -> the entities of :data:`PHOTOS` given to the segmenter as one list of paths
    (different sizes)."""
    entities = segmenter([photos / name for name in PHOTOS])
    assert isinstance(entities, list) and len({e.image_size for e in entities}) >= 4
    return dict(zip(PHOTOS, entities, strict=True))


def test_every_input_kind_gives_what_predict_gives(segmenter, photos, predicted, listed):
    predictions, settings, _ = predicted
    # predict ran with the checkpoint's views, not the composed data config's
    assert settings["views.short_sizes"] == [SHORT_SIDE]
    assert settings["views.crop_layout"] == "fixed8" and settings["views.crop_delta"] == 0.6
    assert sum(len(records_of(predictions, name)) for name in PHOTOS) > 0
    for number, name in enumerate(PHOTOS, start=1):  # predict's image ids: input order
        path = photos / name
        with Image.open(path) as picture:  # the awkward encoding itself, as PIL opens it
            kinds = {"list of paths": listed[name], "PIL": segmenter(picture)}
        if name in ("rgb.jpg", "rotated.jpg"):
            kinds.update(path=segmenter(path), str=segmenter(str(path)))
            kinds["array"] = segmenter(read_rgb_image(path))
        for kind, entities in kinds.items():
            assert isinstance(entities, Entities)
            assert entities.to_coco(number) == records_of(predictions, name), (name, kind)
            assert entities.crop_boxes.shape == (8, 4), (name, kind)
    assert listed["rotated.jpg"].image_size == (128, 96)  # EXIF orientation: portrait


def test_id_map_and_overlay_are_predicts_pictures(photos, predicted, listed):
    _, _, out = predicted
    for name in ("rgb.jpg", "palette.png"):
        entities = listed[name]
        stem = name.rsplit(".", 1)[0]
        id_map = entities.to_id_map()
        assert id_map.dtype == np.uint16
        assert np.array_equal(id_map, np.asarray(Image.open(out / f"{stem}_entities.png")))
        image = read_rgb_image(photos / name)
        overlay = entities.overlay(image)
        encoded = io.BytesIO()
        Image.fromarray(overlay).save(encoded, format="JPEG", quality=90)
        written = (out / f"{stem}_overlay.jpg").read_bytes()
        assert encoded.getvalue() == written  # predict's overlay, byte for byte
        plain = entities.overlay(photos / name, boxes=False)
        # outside every entity and every outline the photo is untouched
        edges = np.zeros(id_map.shape, bool)
        edges[:, 1:] |= id_map[:, 1:] != id_map[:, :-1]
        edges[1:, :] |= id_map[1:, :] != id_map[:-1, :]
        untouched = (id_map == 0) & ~edges
        assert np.array_equal(plain[untouched], image[untouched])
        assert (plain[id_map > 0] != image[id_map > 0]).any()
        # the boxes add the crop outlines and nothing else
        on_box = np.zeros(id_map.shape, bool)
        for k, (x0, y0, x1, y1) in enumerate(entities.crop_boxes.int().tolist()):
            inset = k % 4  # each crop drawn one pixel wide, inset by its rank (viz.draw_boxes)
            x0, y0, x1, y1 = x0 + inset, y0 + inset, x1 - inset, y1 - inset
            for band in (
                np.s_[y0 : y0 + 1, x0:x1],
                np.s_[y1 - 1 : y1, x0:x1],
                np.s_[y0:y1, x0 : x0 + 1],
                np.s_[y0:y1, x1 - 1 : x1],
            ):
                on_box[band] = True
        changed = (overlay != plain).any(-1)
        assert changed.any() and not (changed & ~on_box).any()


def test_areas_boxes_and_coco_records_against_naive_ones(listed):
    entities = listed["rgb.jpg"]
    masks = entities.masks().numpy()  # bool [K, H, W]
    assert len(entities) == len(masks) > 0
    assert entities.areas.tolist() == [int(m.sum()) for m in masks]
    naive_boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        naive_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert entities.boxes.tolist() == np.array(naive_boxes, dtype=float).tolist()
    naive_ids = np.zeros(entities.image_size, np.uint16)
    for k, mask in enumerate(masks, start=1):
        naive_ids[mask] = k
    assert np.array_equal(entities.to_id_map(), naive_ids)
    records = entities.to_coco(7, include_bbox=True)
    assert [r["segmentation"] for r in records] == entities.rles
    assert [r["score"] for r in records] == entities.scores.tolist()
    assert {(r["image_id"], r["category_id"]) for r in records} == {(7, 1)}
    for record, box in zip(records, naive_boxes, strict=True):  # COCO's x, y, w, h
        assert record["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    assert np.array_equal(mask_utils.decode(records[0]["segmentation"]).astype(bool), masks[0])
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": 7, "height": entities.image_size[0], "width": entities.image_size[1]}],
        "annotations": [],
        "categories": [{"id": 1, "name": "entity"}],
    }
    ground_truth.createIndex()
    assert len(ground_truth.loadRes(entities.to_coco(7)).anns) == len(entities)


def test_overrides_change_the_views_in_the_api_and_in_predict(trained, photos, tmp_path):
    fixed4 = EntitySegmenter.from_checkpoint(trained[0], device="cpu", test_crop_layout="fixed4")
    assert fixed4.views.crop_layout == "fixed4"
    assert (fixed4.views.short_sizes, fixed4.views.crop_delta) == ((SHORT_SIDE,), 0.6)
    entities = fixed4(photos / "rgb.jpg")
    assert entities.crop_boxes.shape == (4, 4)
    # experiment=demo's data values (size_scale 0.25, delta 0.7) are not command-line
    # overrides: only data.test_crop_layout is
    predictions, settings = predict(
        trained[0],
        photos / "rgb.jpg",
        tmp_path / "out",
        tmp_path,
        "experiment=demo",
        "data.test_crop_layout=fixed4",
    )
    assert settings["views.crop_layout"] == "fixed4"
    assert settings["views.short_sizes"] == [SHORT_SIDE] and settings["views.crop_delta"] == 0.6
    assert records_of(predictions, "rgb.jpg") == entities.to_coco(1)
    smaller = EntitySegmenter.from_checkpoint(trained[0], device="cpu", size_scale=0.08)
    assert smaller.views.short_sizes == (40,)


def test_evaluate_scores_what_the_segmenter_gives(trained, segmenter, tmp_path):
    checkpoint, folder = trained
    result = run_python(
        "-m",
        "entityseg.evaluate",
        "experiment=demo",  # its data config's views differ from the checkpoint's
        f"ckpt_path={checkpoint}",
        f"paths.data_dir={folder}/data",  # the training run's synthetic set
        "data.num_workers=0",
        "inference.modes=[batch_oc]",
        f"hydra.run.dir={tmp_path}/run",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "run/predictions_batch_oc.json").read_text())
    val = folder / "data/synthetic/val"
    images = json.loads((val / "annotations.json").read_text())["images"]
    expected = [
        record
        for image in images
        for record in segmenter(val / "images" / image["file_name"]).to_coco(image["id"])
    ]
    assert predictions == expected


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data) -> dict:
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for name in ("cropformer_tiny", "mask2former_tiny"):
        folder = shared_data / "official_reference" / name
        paths[name] = (out / f"{name}.ckpt", folder)
        convert_release(folder / "model_final.pth", folder / "config.yaml", paths[name][0])
    return paths


@pytest.mark.parametrize("name", ["cropformer_tiny", "mask2former_tiny"])
def test_a_converted_release_checkpoint_gives_the_release_entities(converted, shared_data, name):
    """Nothing but the checkpoint: the release's views and compat=release come from it (the
    Mask2Former, without a batch decoder, predicts with image_o)."""
    path, folder = converted[name]
    segmenter = EntitySegmenter.from_checkpoint(path, device="cpu")
    assert segmenter.settings.compat == "release" and segmenter.views.crop_resize == "own"
    expected_mode = "image_o" if name.startswith("mask2former") else "batch_oc"
    assert segmenter.settings.mode == expected_mode
    images = shared_data / "coco_panoptic_sample/images"
    for record in json.loads((folder / "entities.json").read_text()):
        entities = segmenter(images / record["file_name"])
        assert len(entities) == len(record["scores"])
        for ours, rle in zip(entities.rles, record["segmentations"], strict=True):
            a = mask_utils.decode(ours).astype(bool)
            b = mask_utils.decode(rle).astype(bool)
            assert (a ^ b).sum() <= 2  # float rounding at a probability of 0.5 (test_release)
        assert entities.scores.tolist() == pytest.approx(record["scores"], abs=1e-6)


def test_bad_inputs_fail_in_one_line(segmenter, trained, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(EntityDataError, match=f"^{broken}: not an image file " + r"\(entityseg"):
        segmenter(broken)
    with pytest.raises(ValueError, match=r"RGB uint8 \[H, W, 3\], got uint8 \[40, 30\]$"):
        segmenter(np.zeros((40, 30), np.uint8))
    with pytest.raises(ValueError, match=r"got float32 \[40, 30, 3\]$"):
        segmenter(np.zeros((40, 30, 3), np.float32))
    with pytest.raises(TypeError, match="a path, a PIL image or"):
        segmenter(3)

    not_ours = tmp_path / "x.ckpt"
    torch.save({"x": 1}, not_ours)
    text = tmp_path / "notes.ckpt"
    text.write_text("a text file\n")
    for path, message in (
        (not_ours, "not an entityseg checkpoint"),
        (text, "not a checkpoint"),
    ):
        with pytest.raises(CheckpointError) as info:
            EntitySegmenter.from_checkpoint(path)
        assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)

    old = read_checkpoint(trained[0])  # a checkpoint from before the views were stored
    del old[VIEWS_KEY]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="stores no test views .*pass views="):
        EntitySegmenter.from_checkpoint(tmp_path / "old.ckpt")
    given = EntitySegmenter.from_checkpoint(
        tmp_path / "old.ckpt", device="cpu", views={"test_short_size": 64, "size_scale": 1.0}
    )
    assert (given.views.short_sizes, given.views.crop_layout) == ((64,), "fixed4")
    assert NET_CONFIG_KEY in old

    for overrides, message in (
        ({"crop_size": 3}, "crop_size=3: unknown setting"),
        ({"crop_delta": 1.5}, r"data.crop_delta=1.5: must be in \(0, 1\]"),
        ({"test_crop_layout": "random"}, "data.test_crop_layout='random': unknown crop layout"),
        ({"compat": "detectron2"}, "inference.compat='detectron2': unknown; expected"),
        ({"max_entities": -1}, "inference.max_entities=-1: must be an integer >= 0"),
        ({"view_chunk": 0}, "inference.view_chunk=0: must be auto"),
    ):
        with pytest.raises(ConfigError, match=message):
            EntitySegmenter.from_checkpoint(trained[0], device="cpu", **overrides)
    with pytest.raises(ConfigError, match="inference.precision='fp16'"):
        EntitySegmenter.from_checkpoint(trained[0], precision="fp16")
    with pytest.raises(ConfigError, match="inference.mode='batch'"):
        EntitySegmenter.from_checkpoint(trained[0], mode="batch")


def test_replace_shares_the_network_and_changes_the_settings(segmenter, photos):
    path = photos / "rgb.jpg"
    other = segmenter.replace(
        mode="batch_c", test_crop_layout="fixed4", crop_delta=0.7, overlapping=True
    )
    assert other.net is segmenter.net and other.settings.mode == "batch_c"
    assert (other.views.crop_layout, other.views.crop_delta) == ("fixed4", 0.7)
    assert other.views.short_sizes == segmenter.views.short_sizes and other.settings.overlapping
    assert len(other(path).crop_boxes) == 4 and len(segmenter(path).crop_boxes) == 8
    everything = other(path)
    threshold = float(everything.scores.median())
    kept = other.replace(score_threshold=threshold)(path)
    assert kept.rles == everything.scoring_at_least(threshold).rles and len(kept) < len(everything)
    record = other.replace(score_threshold=threshold).settings_record()
    assert record["inference.score_threshold"] == threshold
    with pytest.raises(ConfigError, match=r"^inference.score_threshold=1.5: must be in \[0, 1\]"):
        segmenter.replace(score_threshold=1.5)
    with pytest.raises(ConfigError, match="^colour='red': unknown setting"):
        segmenter.replace(colour="red")


def test_segment_modes_gives_each_mode_as_alone(segmenter, photos):
    image = read_rgb_image(photos / "rotated.jpg")
    together = segmenter.segment_modes(image, ["image_o", "batch_oc", "batch_c"])
    for mode, entities in together.items():
        alone = segmenter.segment(image, mode)
        assert entities.rles == alone.rles and entities.scores.tolist() == alone.scores.tolist()


def test_every_method_takes_what_call_takes_with_every_mode_by_default(segmenter, photos):
    path = photos / "rotated.jpg"
    by_path = segmenter.segment_modes(path)  # a path, as __call__ takes it (it raised before)
    assert (
        list(by_path) == segmenter.usable_modes() == ["image_o", "batch_o", "batch_c", "batch_oc"]
    )
    by_pil = segmenter.segment_modes(Image.open(path), ["batch_oc"])
    assert by_pil["batch_oc"].rles == by_path["batch_oc"].rles == segmenter(path).rles
    assert segmenter.segment(str(path), "image_o").rles == by_path["image_o"].rles


def test_entities_print_in_one_short_line(segmenter, photos):
    entities = segmenter(photos / "rotated.jpg")
    height, width = entities.image_size
    low, high = entities.scores.min().item(), entities.scores.max().item()
    assert repr(entities) == (
        f"Entities({len(entities)} of a {width}x{height} image, scores {low:.2f}-{high:.2f}, "
        f"{len(entities.crop_boxes)} crops)"
    )
    assert "counts" not in repr(entities)  # no RLE string floods a notebook cell


def test_coco_json_of_many_images_is_read_by_training_and_scores_itself_perfectly(
    segmenter, photos, tmp_path
):
    from entityseg import coco_json
    from entityseg.data.coco_entity import load_entity_json
    from entityseg.evaluation.entity_ap import evaluate

    names = ["rgb.jpg", "rotated.jpg"]
    entities = {name: segmenter(photos / name) for name in names}
    data = coco_json(entities.items())
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [
        (1, "rgb.jpg"),
        (2, "rotated.jpg"),
    ]
    assert len(data["annotations"]) == sum(len(e) for e in entities.values())
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    first = data["annotations"][0]
    assert first["segmentation"] == entities["rgb.jpg"].rles[0]
    assert first["area"] == int(mask_utils.area(first["segmentation"]))
    assert first["bbox"] == mask_utils.toBbox(first["segmentation"]).tolist()
    path = tmp_path / "pseudo_labels.json"
    path.write_text(json.dumps(data))
    records = load_entity_json(path, photos)  # as training reads its data
    assert [len(r.annotations) for r in records] == [len(entities[n]) for n in names]
    results = [r for image_id, n in enumerate(names, 1) for r in entities[n].to_coco(image_id)]
    assert evaluate(path, results)["AP"] == pytest.approx(100.0)


def test_only_the_modes_that_fuse_crops_carry_and_draw_their_boxes(segmenter, photos):
    image = read_rgb_image(photos / "rgb.jpg")
    by_mode = segmenter.segment_modes(image)
    assert {m: len(e.crop_boxes) for m, e in by_mode.items()} == {
        "image_o": 0,  # the full view alone: no crop was used, none is drawn
        "batch_o": 0,
        "batch_c": 8,
        "batch_oc": 8,
    }
    assert np.array_equal(
        by_mode["image_o"].overlay(image), by_mode["image_o"].overlay(image, boxes=False)
    )
    assert not np.array_equal(
        by_mode["batch_oc"].overlay(image), by_mode["batch_oc"].overlay(image, boxes=False)
    )
