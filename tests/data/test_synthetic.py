"""Tests of the synthetic entity segmentation scenes: determinism, COCO validity, small entities."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from entityseg.data.synthetic import generate_dataset, main, render_scene

SMALL_SIZE = {"height": 192, "width": 256}
NETWORK_SIZE = (256, 192)  # cv2 (width, height): short side 192
CROP_SIZE = (716, 537)  # top-left 0.7 crop of 1024x768, as (width, height)


def _annotations_of(data: dict, image_id: int) -> list[dict]:
    """Annotations of one image, in file order."""
    return [ann for ann in data["annotations"] if ann["image_id"] == image_id]


def _image_bytes(out_dir: Path, file_name: str) -> bytes:
    """Raw bytes of one generated image file."""
    return (out_dir / "images" / file_name).read_bytes()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small images, enough to check the COCO structure quickly."""
    out_dir = tmp_path_factory.mktemp("small")
    return generate_dataset(out_dir, num_images=3, seed=1, **SMALL_SIZE)


@pytest.fixture(scope="module")
def default_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, np.ndarray]:
    """One image at the default 1024x768: its annotations and decoded masks [K, H, W]."""
    out_dir = tmp_path_factory.mktemp("default")
    data = json.loads(generate_dataset(out_dir, num_images=1, seed=0).read_text())
    masks = mask_utils.decode([ann["segmentation"] for ann in data["annotations"]])
    return data, np.moveaxis(masks, -1, 0)


def test_cli_output_is_byte_identical_for_the_same_seed(tmp_path: Path, capsys) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    main(["--out", str(first), "--num-images", "3", "--seed", "0"])
    main(["--out", str(second), "--num-images", "3", "--seed", "0"])
    main(["--out", str(other), "--num-images", "3", "--seed", "1"])

    printed = capsys.readouterr().out.split()
    assert printed == [str(path / "annotations.json") for path in (first, second, other)]
    first_json = (first / "annotations.json").read_bytes()
    assert first_json == (second / "annotations.json").read_bytes()
    assert first_json != (other / "annotations.json").read_bytes()
    for name in ("synthetic_000000.jpg", "synthetic_000001.jpg", "synthetic_000002.jpg"):
        assert (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes()


def test_json_has_no_dates_or_absolute_paths(small_dataset: Path) -> None:
    text = small_dataset.read_text()
    data = json.loads(text)
    assert str(small_dataset.parent) not in text
    assert not [key for key in data["info"] if "date" in key or "time" in key]
    assert data["info"]["seed"] == 1 and data["info"]["num_images"] == 3
    assert data["info"]["height"] == 192 and data["info"]["width"] == 256


def test_image_does_not_depend_on_how_many_images_are_generated(tmp_path: Path) -> None:
    two = json.loads(generate_dataset(tmp_path / "two", 2, seed=5, **SMALL_SIZE).read_text())
    three = json.loads(generate_dataset(tmp_path / "three", 3, seed=5, **SMALL_SIZE).read_text())

    for image_id in (1, 2):
        assert _annotations_of(two, image_id) == _annotations_of(three, image_id)
        name = f"synthetic_{image_id - 1:06d}.jpg"
        assert _image_bytes(tmp_path / "two", name) == _image_bytes(tmp_path / "three", name)


def test_annotations_are_a_valid_coco_partition_of_each_image(small_dataset: Path) -> None:
    coco = COCO(str(small_dataset))
    data = json.loads(small_dataset.read_text())
    assert data["categories"] == [{"id": 1, "name": "entity", "supercategory": "entity"}]
    assert [ann["id"] for ann in data["annotations"]] == list(
        range(1, len(data["annotations"]) + 1)
    )
    assert sorted(coco.getImgIds()) == [1, 2, 3]

    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        with Image.open(small_dataset.parent / "images" / info["file_name"]) as image:
            assert image.size == (info["width"], info["height"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) > 10
        coverage = np.zeros((info["height"], info["width"]), np.int32)
        for ann in annotations:
            mask = coco.annToMask(ann)
            assert mask.shape == (info["height"], info["width"])
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            rle = mask_utils.encode(np.asfortranarray(mask))
            assert ann["area"] == int(mask_utils.area(rle)) == int(mask.sum()) >= 4
            assert ann["bbox"] == [float(value) for value in mask_utils.toBbox(rle)]
            coverage += mask
        assert (coverage == 1).all(), "masks must be disjoint and cover every pixel"


def test_render_scene_returns_consecutive_ids_covering_every_pixel() -> None:
    image, id_map = render_scene(np.random.default_rng(3), 192, 256, num_objects=5, num_small=20)
    assert image.shape == (192, 256, 3) and image.dtype == np.uint8
    assert id_map.shape == (192, 256) and id_map.dtype == np.int32
    assert id_map.min() == 1
    areas = np.bincount(id_map.ravel())[1:]
    assert (areas >= 4).all(), "ids must be consecutive and every entity at least 4 pixels"


def test_default_scene_has_many_small_entities(default_scene: tuple[dict, np.ndarray]) -> None:
    data, _ = default_scene
    areas = np.array([ann["area"] for ann in data["annotations"]])
    assert 60 <= len(areas) <= 90
    assert (areas < 150).sum() >= 20
    assert (areas < 60).sum() >= 10


def _survives(mask: np.ndarray) -> bool:
    """Whether a mask is still non-empty after a nearest-neighbour resize to network size."""
    return bool(cv2.resize(mask, NETWORK_SIZE, interpolation=cv2.INTER_NEAREST).any())


def test_downscaling_loses_small_entities_that_a_crop_recovers(
    default_scene: tuple[dict, np.ndarray],
) -> None:
    data, masks = default_scene
    survives_full = np.array([_survives(mask) for mask in masks])
    assert survives_full.sum() <= 0.9 * len(masks), "downscaling should lose small entities"

    crop_width, crop_height = CROP_SIZE
    inside_crop = [
        index
        for index, ann in enumerate(data["annotations"])
        if ann["bbox"][0] + ann["bbox"][2] <= crop_width
        and ann["bbox"][1] + ann["bbox"][3] <= crop_height
    ]
    assert len(inside_crop) >= 10
    kept_in_crop = np.mean([_survives(masks[i, :crop_height, :crop_width]) for i in inside_crop])
    kept_in_full = np.mean(survives_full[inside_crop])
    assert kept_in_crop > kept_in_full


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("num_images", 0),
        ("height", 63),
        ("width", 10),
        ("num_objects", -1),
        ("num_small", -2),
        ("seed", -1),
        ("quality", 0),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    tmp_path: Path, argument: str, value: int
) -> None:
    arguments = {"num_images": 1, **SMALL_SIZE, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} .*{value}"):
        generate_dataset(tmp_path, **arguments)
    assert not (tmp_path / "annotations.json").exists()


@pytest.mark.parametrize(("argument", "value"), [("height", 32), ("num_small", -1)])
def test_render_scene_rejects_bad_arguments(argument: str, value: int) -> None:
    arguments = {"height": 128, "width": 128, "num_objects": 2, "num_small": 2, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} "):
        render_scene(np.random.default_rng(0), **arguments)


def test_cli_reports_bad_arguments_as_usage_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--num-images", "0"])
    assert exit_info.value.code == 2
    assert "num_images must be >= 1, got 0" in capsys.readouterr().err
