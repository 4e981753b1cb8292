import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_datamodule
from entityseg.config import ConfigError
from entityseg.data.coco_entity import iter_entity_masks, load_entity_json
from entityseg.data.crops import crop_and_resize
from entityseg.data.datamodule import EntityDataModule
from entityseg.data.errors import EntityDataError
from entityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize


def test_training_batch_shapes_and_ids(synthetic_set):
    dm = make_datamodule(synthetic_set, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    images = batch["images"]
    n, v, c, h, w = images.shape
    assert (n, v, c) == (2, 2, 3) and images.dtype == torch.float32
    assert h % 32 == 0 and w % 32 == 0
    assert batch["crop_boxes"].shape == (2, 2, 4)
    assert batch["image_sizes"].shape == batch["orig_sizes"].shape == (2, 2)
    assert batch["num_skipped"] == 0
    records = {
        r.image_id: r
        for r in load_entity_json(synthetic_set / "annotations.json", synthetic_set / "images")
    }
    for i in range(n):
        full, crop = batch["targets"][i]
        assert full["masks"].dtype == torch.bool and full["masks"].shape[1:] == (h, w)
        assert torch.equal(full["ids"], crop["ids"])  # one id = one entity in both views
        assert len(full["ids"]) == full["masks"].shape[0] == crop["masks"].shape[0] > 0
        seen = full["masks"].flatten(1).any(1) | crop["masks"].flatten(1).any(1)
        assert seen.all()  # entities no view shows are left out
        valid_h, valid_w = batch["image_sizes"][i].tolist()
        assert not full["masks"][:, valid_h:].any() and not full["masks"][:, :, valid_w:].any()
        assert torch.all(images[i, :, :, valid_h:] == 0)  # zero padding after normalisation
        ann_ids = {a["id"] for a in records[batch["image_ids"][i].item()].annotations}
        assert set(full["ids"].tolist()) <= ann_ids
        orig_h, orig_w = batch["orig_sizes"][i].tolist()
        assert batch["crop_boxes"][i, 0].tolist() == [0, 0, orig_w, orig_h]
        x0, y0, x1, y1 = batch["crop_boxes"][i, 1].tolist()
        assert (x1 - x0, y1 - y0) == (int(0.7 * orig_w), int(0.7 * orig_h))


def test_views_and_masks_follow_the_crop_box_and_flip(synthetic_set):
    """Rebuild view 1 and its masks from the original image and the recorded box."""
    dm = make_datamodule(synthetic_set, batch_size=1, flip_prob=0.5)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    flips = set()
    for index in range(8):
        sample = dataset[index % len(dataset)]
        record = next(r for r in dataset.records if r.image_id == sample["image_id"])
        h, w = sample["image_size"]
        box = sample["crop_boxes"][1].int().tolist()  # in the mirrored image if flipped
        masks = dict(iter_entity_masks(record))
        ids = sample["targets"][1]["ids"].tolist()
        stacked = np.stack([masks[i] for i in ids])
        image = np.asarray(Image.open(record.path).convert("RGB"))
        if sample["flipped"]:  # as the release: mirror the original, then crop and resize
            stacked, image = stacked[:, :, ::-1], image[:, ::-1]
        expected = crop_and_resize(np.ascontiguousarray(stacked), box, (h, w), is_mask=True)
        assert np.array_equal(sample["targets"][1]["masks"].numpy(), expected.astype(bool))
        view = crop_and_resize(np.ascontiguousarray(image), box, (h, w))
        restored = denormalize(sample["images"][1], IMAGENET_MEAN, IMAGENET_STD)
        assert np.abs(restored.astype(int) - view.astype(int)).max() <= 1
        flips.add(sample["flipped"])
    assert flips == {True, False}


@pytest.mark.parametrize(
    ("layout", "delta", "views"), [("fixed4", 0.7, 5), ("fixed8", 0.7, 9), ("grid", 0.5, 10)]
)
def test_validation_batches_hold_all_test_crops(synthetic_set, layout, delta, views):
    """Every test layout evaluates (``grid`` at delta 0.5: 3 x 3 crops + the full view)."""
    dm = make_datamodule(synthetic_set, test_crop_layout=layout, crop_delta=delta, val_batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape[:3] == (2, views, 3)
    assert "targets" not in batch
    first = dm.datasets["val"][0]
    assert torch.equal(first["images"], dm.datasets["val"][0]["images"])  # deterministic


def test_short_side_follows_the_scaled_recipe(synthetic_set):
    dm = make_datamodule(synthetic_set, size_scale=0.25)
    dm.setup("fit")
    assert dm.train_views.short_sizes == (160, 168, 176, 184, 192, 200)
    sample = dm.datasets["val"][0]
    assert min(sample["image_size"]) == 200  # 800 x 0.25
    sizes = {min(dm.datasets["train"][0]["image_size"]) for _ in range(30)}
    assert sizes <= set(dm.train_views.short_sizes) and len(sizes) > 2


def test_small_images_are_upscaled(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((24, 32, 3), 100, np.uint8)).save(images / "s.png")
    mask = np.zeros((24, 32), np.uint8)
    mask[4:12, 4:20] = 1
    from entityseg.data.coco_entity import mask_to_annotation

    data = {
        "images": [{"id": 1, "file_name": "s.png", "height": 24, "width": 32}],
        "annotations": [mask_to_annotation(1, 1, mask)],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    dm = make_datamodule(tmp_path, batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert min(batch["image_sizes"][0].tolist()) in dm.train_views.short_sizes
    assert batch["targets"][0][0]["masks"].any()


def _corrupt_first_image(root):
    records = load_entity_json(root / "annotations.json", root / "images")
    records[0].path.write_bytes(b"")
    return records[0]


def test_bad_training_image_is_skipped_logged_and_counted(synthetic_set, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_set, root)
    bad = _corrupt_first_image(root)
    dm = make_datamodule(root, batch_size=1)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    with caplog.at_level(logging.WARNING):
        sample = dataset[0]
    assert sample["num_skipped"] == 1 and sample["image_id"] != bad.image_id
    assert dataset.stats["skipped_image"] == 1
    assert f"{bad.path}: image file is empty" in caplog.text

    strict = make_datamodule(root, batch_size=1, strict=True)
    strict.setup("fit")
    with pytest.raises(EntityDataError, match="image file is empty"):
        strict.datasets["train"][0]
    with pytest.raises(EntityDataError, match="image file is empty"):
        dm.datasets["val"][0]  # evaluation never skips: it would change AP^e


def test_images_without_entities_are_kept_for_evaluation_only(synthetic_set, tmp_path):
    data = json.loads((synthetic_set / "annotations.json").read_text())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    (tmp_path / "images").symlink_to(synthetic_set / "images")
    dm = make_datamodule(tmp_path)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 4
    keep = make_datamodule(tmp_path, skip_empty_train=False)
    keep.setup("fit")
    assert len(keep.datasets["train"]) == 4


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(crop_delta=1.5), "crop_delta"),
        (dict(crop_delta=0), "crop_delta"),
        (dict(train_crop_layout="grid9"), "train_crop_layout"),
        (dict(test_crop_layout="random"), "test_crop_layout"),
        (dict(batch_size=-2), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(train_json="/nonexistent/a.json"), "train_json"),
        (dict(val_images="/nonexistent/images"), "val_images"),
        (dict(train_crop_resize="half"), "train_crop_resize"),
        (dict(train_augmentation="mosaic"), "train_augmentation"),
        (dict(lsj_image_size=0), "lsj_image_size"),
        (dict(lsj_scale=[2.0, 0.1]), "lsj_scale"),
        (dict(lsj_scale=[0.5]), "lsj_scale"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(keep_invisible_entities="yes"), "keep_invisible_entities"),
        (dict(resolution="medium"), "resolution"),
        (dict(train_json=[]), "train_json"),
    ],
)
def test_bad_arguments_name_the_key(synthetic_set, kwargs, key):
    with pytest.raises(ConfigError) as info:
        make_datamodule(synthetic_set, **kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}={list(kwargs.values())[0]!r}: ")


def test_training_views_take_the_recipe_settings(synthetic_set):
    dm = make_datamodule(synthetic_set)
    views = dm.train_views
    assert (views.augmentation, views.crop_resize, views.keep_invisible_entities) == (
        "crop_views",
        "same",
        False,
    )
    dm = make_datamodule(
        synthetic_set,
        train_augmentation="lsj",
        lsj_image_size=1024,
        lsj_scale=[0.1, 2.0],
        train_crop_resize="own",
        keep_invisible_entities=True,
        size_scale=0.25,
    )
    views = dm.train_views
    assert (views.augmentation, views.lsj_image_size, views.lsj_scale) == ("lsj", 256, (0.1, 2.0))
    assert views.crop_resize == "own" and views.keep_invisible_entities is True
    assert dm.test_views.crop_resize == "same"  # test views keep their own setting


def test_training_parts_with_their_own_folders(synthetic_set, tmp_path):
    data = json.loads((synthetic_set / "annotations.json").read_text())
    jsons, folders = [], []
    for part, images in enumerate((data["images"][:3], data["images"][3:])):
        folder = tmp_path / f"part{part}"
        folder.mkdir()
        for image in images:
            (folder / image["file_name"]).symlink_to(synthetic_set / "images" / image["file_name"])
        ids = {image["id"] for image in images}
        anns = [a for a in data["annotations"] if a["image_id"] in ids]
        jsons.append(tmp_path / f"part{part}.json")
        jsons[-1].write_text(json.dumps({**data, "images": images, "annotations": anns}))
        folders.append(str(folder))
    dm = make_datamodule(
        synthetic_set, train_json=[str(j) for j in jsons], train_images=folders, batch_size=2
    )
    dm.setup("fit")
    records = dm.datasets["train"].records
    assert [r.path.parent.name for r in records] == ["part0"] * 3 + ["part1"]
    assert sorted(r.image_id for r in records) == sorted(i["id"] for i in data["images"])
    assert next(iter(dm.train_dataloader()))["images"].shape[:2] == (2, 2)
    one_folder = make_datamodule(
        synthetic_set,
        train_json=[str(synthetic_set / "annotations.json")],
        train_images=[str(synthetic_set / "images")],
    )
    one_folder.setup("fit")
    assert len(one_folder.datasets["train"]) == 4
    with pytest.raises(ConfigError, match="2 image folders for 1 annotation files"):
        make_datamodule(synthetic_set, train_json=[str(jsons[0])], train_images=folders)
    with pytest.raises(ConfigError) as info:
        make_datamodule(synthetic_set, train_json=[str(jsons[0]), "/none/b.json"])
    assert str(info.value) == "train_json='/none/b.json': annotation file not found"


def test_synthetic_set_is_generated_on_first_use(tmp_path):
    root = tmp_path / "syn"
    dm = EntityDataModule(
        train_json=str(root / "train/annotations.json"),
        train_images=str(root / "train/images"),
        val_json=str(root / "val/annotations.json"),
        val_images=str(root / "val/images"),
        synthetic=dict(num_train=2, num_val=1, seed=3, height=96, width=128),
        num_workers=0,
        size_scale=0.25,
        batch_size=1,
    )
    dm.prepare_data(splits=("val",))  # the web app's examples: the validation scenes only
    assert (root / "val/annotations.json").is_file() and not (root / "train").exists()
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    before = (root / "train/annotations.json").read_bytes()
    dm.prepare_data()  # already there: left alone
    assert (root / "train/annotations.json").read_bytes() == before


def test_real_coco_photos_give_the_release_views(coco_sample, shared_data, tmp_path):
    """The release's own prepared views (MIN_SIZE_TEST 160, MAX_SIZE_TEST 256) are reproduced."""
    from entityseg.data.coco_entity import panoptic_to_entity_json

    entity_json = panoptic_to_entity_json(
        coco_sample / "panoptic.json", coco_sample / "panoptic", tmp_path / "entity.json"
    )
    dm = EntityDataModule(
        train_json=str(entity_json),
        train_images=str(coco_sample / "images"),
        val_json=str(entity_json),
        val_images=str(coco_sample / "images"),
        num_workers=0,
        test_short_size=160,
        test_max_size=256,
    )
    dm.setup("fit")
    reference = torch.load(
        shared_data / "official_reference/cropformer_tiny/outputs.pt", weights_only=True
    )
    val = dm.datasets["val"]
    for index in range(2):
        sample = val[index]
        full = reference[f"{index}.image"].permute(1, 2, 0).numpy()
        assert tuple(sample["image_size"]) == full.shape[:2]
        ours = denormalize(sample["images"][0], IMAGENET_MEAN, IMAGENET_STD)
        assert np.array_equal(ours, full)
        regions = reference[f"{index}.crop_region"]
        assert torch.equal(sample["crop_boxes"][1:].long(), regions)
        image = np.asarray(Image.open(val.records[index].path).convert("RGB"))
        for crop, box in zip(reference[f"{index}.image_crop"], regions.tolist(), strict=True):
            expected = crop.permute(1, 2, 0).numpy()  # the release sizes crops on their own
            assert np.array_equal(crop_and_resize(image, box, expected.shape[:2]), expected)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[:3] == (2, 2, 3)
    assert all(len(t[0]["ids"]) > 10 for t in batch["targets"])
