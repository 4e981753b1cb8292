import json
import logging
from collections import Counter

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import run_python
from entityseg.data.coco_entity import (
    decode_entity_mask,
    iter_entity_masks,
    load_entity_json,
    panoptic_to_entity_json,
    read_entity_image,
    read_rgb_image,
)
from entityseg.data.errors import EntityDataError

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]
BOWTIE = [[2.0, 2.0, 12.0, 10.0, 12.0, 2.0, 2.0, 10.0]]


def write_coco(tmp_path, annotations, size=(20, 30), name="a.png"):
    """A one-image COCO json over a random RGB PNG of ``size`` (h, w)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / name)
    data = {
        "images": [{"id": 1, "file_name": name, "height": size[0], "width": size[1]}],
        "annotations": [{"image_id": 1, "category_id": 1, "iscrowd": 0, **a} for a in annotations],
        "categories": [{"id": 1, "name": "entity"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, images


def test_every_format_decodes_like_pycocotools(tmp_path):
    square = np.zeros((20, 30), dtype=np.uint8)
    square[5:15, 3:20] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
    uncompressed = {"size": [20, 30], "counts": _uncompressed_counts(square)}
    anns = [
        {"id": 1, "segmentation": compressed},
        {"id": 2, "segmentation": uncompressed},
        {"id": 3, "segmentation": SQUARE},
        {"id": 4, "segmentation": compressed, "iscrowd": 1, "category_id": 7},
        {"id": 5, "segmentation": SQUARE, "category_id": 42},
    ]
    json_path, image_dir = write_coco(tmp_path, anns)
    [record] = load_entity_json(json_path, image_dir)
    assert record.num_crowd == 1
    assert [a["id"] for a in record.annotations] == [1, 2, 3, 5]
    coco = COCO(str(json_path))
    for ann_id, mask in iter_entity_masks(record):
        assert np.array_equal(mask, coco.annToMask(coco.anns[ann_id]))
    assert np.array_equal(decode_entity_mask(anns[1], 20, 30, json_path), square)


def _uncompressed_counts(mask):
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    return counts if flat[0] == 0 else [0, *counts]


def test_synthetic_json_is_read_and_decoded(synthetic_set):
    records = load_entity_json(synthetic_set / "annotations.json", synthetic_set / "images")
    assert len(records) == 4
    for record in records:
        image = read_entity_image(record)
        assert image.shape == (record.height, record.width, 3) and image.dtype == np.uint8
        masks = [m for _, m in iter_entity_masks(record)]
        assert len(masks) == len(record.annotations) > 0


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=100)
    image = read_rgb_image(tmp_path / "r.jpg")
    assert image.shape == (40, 10, 3)
    assert image[:15].mean() > 200 and image[25:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize(
    ("mode", "array", "expected_gray"),
    [
        ("L", np.full((6, 8), 77, np.uint8), 77),
        ("RGBA", np.dstack([np.full((6, 8, 3), 90, np.uint8), np.zeros((6, 8), np.uint8)]), 90),
        ("I;16", np.full((6, 8), 300 * 256 // 2, np.uint16), 150),
    ],
)
def test_grayscale_rgba_and_16_bit_become_rgb8(tmp_path, mode, array, expected_gray):
    Image.fromarray(array).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == mode
    image = read_rgb_image(tmp_path / "x.png")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert np.all(image == expected_gray)


def _truncated_jpeg(path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 128).save(path.with_suffix(".tmp.jpg"))
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "image file not found"),
        (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
        (lambda p: p.write_text("hello, not a picture"), "not an image file"),
        (_truncated_jpeg, "corrupt image"),
    ],
)
def test_unreadable_images_name_the_file(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(EntityDataError, match=message) as info:
        read_rgb_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_image_size_must_match_the_json(tmp_path):
    json_path, image_dir = write_coco(tmp_path, [{"id": 1, "segmentation": SQUARE}])
    data = json.loads(json_path.read_text())
    data["images"][0]["width"] = 31
    json_path.write_text(json.dumps(data))
    [record] = load_entity_json(json_path, image_dir)
    with pytest.raises(EntityDataError, match="image is 30x20 .* says 31x20"):
        read_entity_image(record)


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([], "annotation 9: empty polygon"),
        ([[1.0, 1.0, 5.0, 5.0]], "annotation 9: empty polygon"),
        ([[1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0]], "odd number"),
        ([[1.0, 1.0, 5.0, 1.0, 9.0, 1.0]], "polygon covers no pixel"),
        (BOWTIE, "annotation 9: self-intersecting polygon"),
        ({"size": [21, 30], "counts": "abc"}, r"RLE size \[21, 30\] disagrees with image size"),
        ({"size": [20, 30]}, "RLE without"),
        ("a string", "segmentation of type str"),
    ],
)
def test_bad_annotations_name_file_and_id(tmp_path, segmentation, message):
    json_path, image_dir = write_coco(tmp_path, [{"id": 9, "segmentation": segmentation}])
    [record] = load_entity_json(json_path, image_dir)
    with pytest.raises(EntityDataError, match=message) as info:
        list(iter_entity_masks(record, strict=True))
    assert f"{json_path} (image a.png): annotation 9: " in str(info.value)


def test_non_strict_skips_and_counts_bad_annotations(tmp_path, caplog):
    anns = [
        {"id": 1, "segmentation": []},
        {"id": 2, "segmentation": BOWTIE},
        {"id": 3, "segmentation": SQUARE},
    ]
    json_path, image_dir = write_coco(tmp_path, anns)
    [record] = load_entity_json(json_path, image_dir)
    stats = Counter()
    with caplog.at_level(logging.WARNING):
        kept = dict(iter_entity_masks(record, strict=False, stats=stats))
    assert list(kept) == [2, 3]  # the bowtie is kept, rasterised as pycocotools does
    bowtie = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(BOWTIE, 20, 30)))
    assert np.array_equal(kept[2], bowtie)
    assert stats == Counter(skipped_annotation=1, self_intersecting_polygon=1)
    assert "annotation 1: empty polygon" in caplog.text
    assert "annotation 2: self-intersecting polygon" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "top level is not an object"),
        ('{"images": []}', "no 'annotations' list"),
        ('{"images": [{"id": 1}], "annotations": []}', "lacks"),
        (
            '{"images": [], "annotations": [{"id": 3, "image_id": 1, "segmentation": []}]}',
            "annotation 3: image_id 1 is not in 'images'",
        ),
        ("{not json", "not valid json"),
    ],
)
def test_json_that_is_not_coco(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(EntityDataError, match=message) as info:
        load_entity_json(path, tmp_path)
    assert str(path) in str(info.value)


def test_missing_json(tmp_path):
    with pytest.raises(EntityDataError, match="annotation file not found"):
        load_entity_json(tmp_path / "nope.json", tmp_path)


def test_coco_panoptic_becomes_entities(coco_sample, tmp_path):
    out = panoptic_to_entity_json(
        coco_sample / "panoptic.json", coco_sample / "panoptic", tmp_path / "entity.json"
    )
    panoptic = json.loads((coco_sample / "panoptic.json").read_text())
    records = load_entity_json(out, coco_sample / "images")
    assert [len(r.annotations) + r.num_crowd for r in records] == [18, 32]
    for record, pan in zip(records, panoptic["annotations"], strict=True):
        png = np.asarray(Image.open(coco_sample / "panoptic" / pan["file_name"]), dtype=np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        masks = [m for _, m in iter_entity_masks(record)]
        union = np.sum(masks, axis=0)
        assert union.max() == 1  # entities do not overlap
        crowd = {s["id"] for s in pan["segments_info"] if s["iscrowd"]}
        assert np.array_equal(union == 1, (ids > 0) & ~np.isin(ids, list(crowd)))
        areas = sorted(int(m.sum()) for m in masks)
        assert areas == sorted(s["area"] for s in pan["segments_info"] if not s["iscrowd"])
        assert read_entity_image(record).shape == (record.height, record.width, 3)


def in_memory_entity_json(panoptic_json, panoptic_dir):
    """What the converter wrote before it streamed: the whole entity json built in memory,
    from the panoptic PNGs read here with PIL and encoded with pycocotools."""
    data = json.loads(panoptic_json.read_text())
    annotations = []
    for pan in data["annotations"]:
        rgb = np.asarray(Image.open(panoptic_dir / pan["file_name"]).convert("RGB"), np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        for seg in pan["segments_info"]:
            rle = mask_utils.encode(np.asfortranarray(ids == seg["id"], dtype=np.uint8))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": pan["image_id"],
                    "category_id": 1,
                    "segmentation": {
                        "size": [int(v) for v in rle["size"]],
                        "counts": rle["counts"].decode(),
                    },
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": seg.get("iscrowd", 0),
                }
            )
    images = [
        {"id": i["id"], "file_name": i["file_name"], "height": i["height"], "width": i["width"]}
        for i in data["images"]
    ]
    categories = [{"id": 1, "name": "entity", "supercategory": "entity"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_panoptic(root, id_maps, crowd=()):
    """A COCO panoptic json and PNGs (ids as R + 256 G + 65536 B) of ``id_maps``, 0 = void."""
    (root / "panoptic").mkdir(parents=True)
    images, annotations = [], []
    for image_id, ids in enumerate(id_maps, start=1):
        name = f"{image_id:012d}.png"
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / name)
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 6, "width": 9, "x": 1}
        )
        segments = [
            {
                "id": int(s),
                "category_id": 7,
                "area": int((ids == s).sum()),
                "iscrowd": int(s in crowd),
            }
            for s in np.unique(ids)
            if s
        ]
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "panoptic.json", root / "panoptic"


def test_streamed_conversion_equals_the_in_memory_json(tmp_path):
    rng = np.random.default_rng(0)
    id_maps = [
        rng.choice([0, 5, 300, 70000], size=(6, 9)),  # ids in all three channels, some void
        np.zeros((6, 9), np.int64),  # no segment at all
        np.repeat([[1, 1, 1, 2, 2, 2, 3, 3, 3]], 6, axis=0),
    ]
    panoptic_json, panoptic_dir = write_panoptic(tmp_path, id_maps, crowd={2})
    out = panoptic_to_entity_json(panoptic_json, panoptic_dir, tmp_path / "out" / "entity.json")
    expected = in_memory_entity_json(panoptic_json, panoptic_dir)
    assert [a["image_id"] for a in expected["annotations"]] == [1, 1, 1, 3, 3, 3]
    assert out.read_text() == json.dumps(expected)  # the text json.dump wrote, byte for byte
    assert [p.name for p in out.parent.iterdir()] == ["entity.json"]  # no temporary file left


def test_a_failed_conversion_leaves_no_json(tmp_path):
    ids = np.repeat([[1, 1, 1, 2, 2, 2, 3, 3, 3]], 6, axis=0)
    panoptic_json, panoptic_dir = write_panoptic(tmp_path, [ids, ids])
    (panoptic_dir / "000000000002.png").write_bytes(b"")
    out = tmp_path / "out" / "entity.json"
    with pytest.raises(EntityDataError, match="000000000002.png: cannot read panoptic PNG"):
        panoptic_to_entity_json(panoptic_json, panoptic_dir, out)
    assert list(out.parent.iterdir()) == []


def test_coco_panoptic_cli_streams_the_in_memory_json(coco_sample, tmp_path):
    out = tmp_path / "entity.json"
    panoptic_json, panoptic_dir = coco_sample / "panoptic.json", coco_sample / "panoptic"
    result = run_python("-m", "entityseg.data.coco_entity", panoptic_json, panoptic_dir, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "panoptic -> entities" in result.stderr and "100%" in result.stderr  # progress bar
    expected = in_memory_entity_json(panoptic_json, panoptic_dir)
    assert len(expected["annotations"]) == 18 + 32
    assert out.read_text() == json.dumps(expected)
