"""Our training views against the release's own mapper outputs (``training.pt``).

``official_reference/cropformer_tiny/training.pt`` holds what ``entity_crop`` made of the two
COCO photos (short side 160, max 256, flip, one fixed4 crop), ``mask2former_tiny/training.pt``
what ``coco_instance_lsj`` made (256 square, the drawn resize / crop / pad as text). We rebuild
both from the recorded draws and compare pixels and masks.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from entityseg.data.coco_entity import (
    iter_entity_masks,
    load_entity_json,
    panoptic_to_entity_json,
    read_entity_image,
)
from entityseg.data.crops import crop_and_resize, crop_boxes, pil_nearest_index
from entityseg.data.lsj import LSJ_PAD_VALUE, lsj_crop_offset, lsj_resize_size
from entityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, flip_box
from entityseg.data.views import (
    EntityViewsDataset,
    ViewConfig,
    collate_views,
    crop_views_sample,
    entity_targets,
    lsj_sample,
    render_crop_views,
    render_lsj_view,
)

SHORT, MAX_SIZE, LSJ_SIZE = 160, 256, 256  # the reference runs' MIN/MAX_SIZE_TRAIN, IMAGE_SIZE


def view_config(**kwargs) -> ViewConfig:
    args = dict(
        short_sizes=(SHORT,),
        max_size=MAX_SIZE,
        crop_layout="fixed4",
        crop_delta=0.7,
        flip_prob=0.5,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
        lsj_image_size=LSJ_SIZE,
    )
    return ViewConfig(**{**args, **kwargs})


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory) -> list[dict]:
    """Each COCO photo: image, masks [M, H, W] in the release's order, ids, its record."""
    sample = shared_data / "coco_panoptic_sample"
    out = tmp_path_factory.mktemp("release_views") / "entity.json"
    records = load_entity_json(
        panoptic_to_entity_json(sample / "panoptic.json", sample / "panoptic", out),
        sample / "images",
    )
    panoptic = json.loads((sample / "panoptic.json").read_text())
    photos = []
    for record, pan in zip(records, panoptic["annotations"], strict=True):
        ids, masks = zip(*iter_entity_masks(record), strict=True)
        segments = [s["id"] for s in pan["segments_info"] if not s["iscrowd"]]
        photos.append(
            dict(
                record=record,
                image=read_entity_image(record),
                ids=list(ids),
                masks=np.stack(masks),  # [M, H, W] uint8, in panoptic segment order
                segment_ids=segments,
            )
        )
    return photos


def load_reference(shared_data: Path, model: str) -> dict:
    return torch.load(
        shared_data / "official_reference" / model / "training.pt",
        weights_only=True,
        map_location="cpu",
    )


@pytest.fixture(scope="module")
def cropformer_ref(shared_data) -> dict:
    return load_reference(shared_data, "cropformer_tiny")


@pytest.fixture(scope="module")
def lsj_ref(shared_data) -> dict:
    return load_reference(shared_data, "mask2former_tiny")


def pairs(photo: dict):
    return zip(photo["ids"], photo["masks"], strict=True)


def hwc(chw: torch.Tensor) -> np.ndarray:
    return chw.permute(1, 2, 0).numpy()


def test_entities_are_in_the_release_order(photos, cropformer_ref, lsj_ref):
    for i, photo in enumerate(photos):
        assert photo["segment_ids"] == cropformer_ref[f"{i}.segment_ids"].tolist()
        assert photo["segment_ids"] == lsj_ref[f"{i}.segment_ids"].tolist()


@pytest.mark.parametrize("index", [0, 1])
def test_crop_views_are_the_release_entity_crop(photos, cropformer_ref, index):
    """Same draws (short 160, max 256, the recorded flip and crop_region), ``"own"`` crop size:
    the same full view and crop view, pixels and masks identical."""
    ref, photo = cropformer_ref, photos[index]
    flipped = bool(ref["flipped"][index])
    crop_region = tuple(ref[f"{index}.crop_region"][0].tolist())
    # the release's grid is drawn on the flipped image; the same size, so the same grid
    height, width = photo["image"].shape[:2]
    assert crop_region in crop_boxes(height, width, "fixed4", 0.7)
    views = render_crop_views(
        photo["image"],
        pairs(photo),
        short=SHORT,
        max_size=MAX_SIZE,
        flipped=flipped,
        crop_box=crop_region,
        crop_resize="own",
    )
    full, crop = views.images
    assert np.array_equal(full, hwc(ref[f"{index}.image"]))
    assert np.array_equal(crop, hwc(ref[f"{index}.image_crop"][0]))
    assert np.array_equal(views.masks[0].astype(bool), ref[f"{index}.full.masks"].numpy())
    assert np.array_equal(views.masks[1].astype(bool), ref[f"{index}.crop0.masks"].numpy())
    # the release's valid flags are "mask not empty" here
    for view, key in zip(views.masks, ("full", "crop0"), strict=True):
        assert (
            view.reshape(len(view), -1).any(1).tolist()
            == ref[f"{index}.{key}.valid"].bool().tolist()
        )
    assert views.image_size == [full.shape[:2], crop.shape[:2]]
    assert views.boxes[1] == crop_region


def test_crop_views_sample_normalises_the_same_pixels(photos, cropformer_ref):
    """The sample made from the draws: images denormalise to the release's pixels; targets
    keep every entity (all are visible in the full view); boxes as the release's."""
    photo = photos[0]
    cfg = view_config(crop_resize="own", keep_invisible_entities=True)
    region = tuple(cropformer_ref["0.crop_region"][0].tolist())
    flipped = bool(cropformer_ref["flipped"][0])
    sample = crop_views_sample(
        photo["image"], pairs(photo), cfg, short=SHORT, flipped=flipped, crop_box=region
    )
    full_h, full_w = cropformer_ref["0.image"].shape[-2:]
    crop_h, crop_w = cropformer_ref["0.image_crop"].shape[-2:]
    assert sample["image_size"] == [(full_h, full_w), (crop_h, crop_w)]
    restored = denormalize(sample["images"][1, :, :crop_h, :crop_w], IMAGENET_MEAN, IMAGENET_STD)
    assert np.array_equal(restored, hwc(cropformer_ref["0.image_crop"][0]))
    assert torch.all(sample["images"][0, :, :, full_w:] == 0)  # the narrower view, zero-padded
    masks = sample["targets"][1]["masks"]
    assert torch.equal(masks[:, :crop_h, :crop_w], cropformer_ref["0.crop0.masks"])
    assert sample["crop_boxes"].tolist() == [[0, 0, 640, 427], list(region)]


def test_fixed4_index_maps_through_the_flip(photos):
    """The release crops the flipped image: its box k is our box k in the flipped image, the
    box k ^ 1 in the original; cropping the original at that box and mirroring the view gives
    the same pixels (Pillow bilinear is mirror-symmetric), masks up to Pillow-nearest ties."""
    image, masks = photos[0]["image"], photos[0]["masks"]
    height, width = image.shape[:2]
    grid = crop_boxes(height, width, "fixed4", 0.7)
    size = (160, 240)
    tie_pixels = 0
    for k, box in enumerate(grid):
        assert flip_box(box, width) == grid[k ^ 1]
        flipped_first = crop_and_resize(image, box, size, flip=True)
        mirrored_view = crop_and_resize(image, grid[k ^ 1], size)[:, ::-1]
        assert np.array_equal(flipped_first, mirrored_view)
        assert np.array_equal(flipped_first, crop_and_resize(image[:, ::-1].copy(), box, size))
        mask_first = crop_and_resize(masks, box, size, is_mask=True, flip=True)
        assert np.array_equal(
            mask_first, crop_and_resize(masks[:, :, ::-1].copy(), box, size, is_mask=True)
        )
        tie_pixels += int(
            (mask_first != crop_and_resize(masks, grid[k ^ 1], size, is_mask=True)[..., ::-1]).sum()
        )
    assert tie_pixels > 0  # why the flip comes first


def test_same_size_crop_view_differs_from_own_by_a_pixel(photos, cropformer_ref):
    """``"same"`` (ours) vs ``"own"`` (the release) on the recorded draws: one pixel of size,
    and the pixels and masks of a slightly different scale (numbers in the report)."""
    for index, photo in enumerate(photos):
        region = tuple(cropformer_ref[f"{index}.crop_region"][0].tolist())
        flipped = bool(cropformer_ref["flipped"][index])
        kwargs = dict(short=SHORT, max_size=MAX_SIZE, flipped=flipped, crop_box=region)
        same = render_crop_views(photo["image"], pairs(photo), crop_resize="same", **kwargs)
        own = render_crop_views(photo["image"], pairs(photo), crop_resize="own", **kwargs)
        assert np.array_equal(same.images[0], own.images[0])
        assert np.array_equal(same.masks[0], own.masks[0])
        (sh, sw), (oh, ow) = same.images[1].shape[:2], own.images[1].shape[:2]
        assert (sh, sw) == same.images[0].shape[:2]
        assert abs(sh - oh) + abs(sw - ow) == 1
        h, w = min(sh, oh), min(sw, ow)
        differ = same.masks[1][:, :h, :w] != own.masks[1][:, :h, :w]
        assert differ.mean() < 0.02


def parse_lsj(text: str) -> dict:
    """The draws of a recorded detectron2 ``TransformList`` (flip, resize, crop, pad)."""

    def ints(name: str) -> dict:
        body = re.search(rf"{name}\((.*?)\)(?:, \w+\(|\]$)", text).group(1)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(?:np\.int64\()?(-?\d+)", body)}

    resize, crop, pad = ints("ResizeTransform"), ints("CropTransform"), ints("PadTransform")
    return dict(
        flipped="HFlipTransform" in text,
        size=(resize["h"], resize["w"]),
        resized=(resize["new_h"], resize["new_w"]),
        offset=(crop["y0"], crop["x0"]),
        crop=(crop["h"], crop["w"]),
        pad=(pad["y1"], pad["x1"]),
        pad_value=float(re.search(r"pad_value=([\d.]+)", text).group(1)),
    )


@pytest.mark.parametrize("index", [0, 1])
def test_lsj_view_is_the_release_coco_instance_lsj(photos, lsj_ref, index):
    """The recorded resize / crop / pad applied by ours: the same image, the same masks where
    the image is; the release pads masks with True (detectron2's seg_pad_value 255 reaches
    instance masks), ours with 0; ``mask_pad_value=1`` reproduces the release's exactly."""
    draws = parse_lsj(lsj_ref[f"{index}.transforms"])
    photo = photos[index]
    assert draws["size"] == photo["image"].shape[:2]
    assert draws["crop"] == (LSJ_SIZE, LSJ_SIZE) and draws["pad_value"] == LSJ_PAD_VALUE
    # some scale in the range gives the recorded size; the recorded offset is a fraction's
    scale = max(draws["resized"]) / LSJ_SIZE
    assert 0.1 <= scale <= 2.0
    assert lsj_resize_size(*draws["size"], LSJ_SIZE, scale) == draws["resized"]
    max_offset = np.maximum(np.subtract(draws["resized"], LSJ_SIZE), 0)
    fraction = draws["offset"][1] / max_offset[1] if max_offset[1] else 0.0
    assert lsj_crop_offset(draws["resized"], LSJ_SIZE, fraction) == draws["offset"]

    args = dict(
        flipped=draws["flipped"],
        resized=draws["resized"],
        offset=draws["offset"],
        image_size=LSJ_SIZE,
    )
    ours = render_lsj_view(photo["image"], pairs(photo), **args)
    valid_h, valid_w = ours.image_size
    assert (LSJ_SIZE - valid_h, LSJ_SIZE - valid_w) == draws["pad"]
    assert np.array_equal(ours.images[0], hwc(lsj_ref[f"{index}.image"]))
    release = lsj_ref[f"{index}.full.masks"].numpy()  # [M, 256, 256]
    masks = ours.masks[0].astype(bool)
    assert np.array_equal(masks[:, :valid_h, :valid_w], release[:, :valid_h, :valid_w])
    assert not masks[:, valid_h:].any() and not masks[:, :, valid_w:].any()
    assert release[:, valid_h:].all() and release[:, :, valid_w:].all()  # the release's quirk
    quirk = render_lsj_view(photo["image"], pairs(photo), mask_pad_value=1, **args)
    assert np.array_equal(quirk.masks[0].astype(bool), release)


def test_lsj_sample_drops_entities_the_crop_cuts_away(photos, lsj_ref):
    """Image 0's recorded crop leaves 4 entities empty: our sample drops them (the release
    keeps them only because its padded masks are True), V = 1, the padding is 128 grey."""
    draws = parse_lsj(lsj_ref["0.transforms"])
    photo = photos[0]
    stats = Counter()
    cfg = view_config(augmentation="lsj")
    sample = lsj_sample(
        photo["image"],
        pairs(photo),
        cfg,
        flipped=draws["flipped"],
        resized=draws["resized"],
        offset=draws["offset"],
        stats=stats,
    )
    assert sample["images"].shape == (1, 3, LSJ_SIZE, LSJ_SIZE)
    assert sample["crop_boxes"].tolist() == [[0, 0, 640, 427]]
    assert sample["image_size"] == (249, 256)
    grey = (LSJ_PAD_VALUE - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(sample["images"][0, :, 249:, :].mean((1, 2)), grey)
    [target] = sample["targets"]
    assert stats["entity_not_visible"] == 4 == len(photo["ids"]) - len(target["ids"])
    assert target["masks"].flatten(1).any(1).all()
    release = lsj_ref["0.full.masks"][:, :249]
    kept = [photo["ids"].index(i) for i in target["ids"].tolist()]
    assert torch.equal(target["masks"][:, :249], release[kept])


def test_lsj_draws_follow_detectron2():
    # ResizeScale: the long side becomes scale x S, np.round (half to even)
    assert lsj_resize_size(427, 640, 1024, 0.5) == (342, 512)  # 341.6
    assert lsj_resize_size(640, 427, 1024, 2.0) == (2048, 1366)
    assert lsj_resize_size(100, 100, 256, 0.1) == (26, 26)  # 25.6
    assert lsj_resize_size(3, 1, 10, 0.25) == (2, 1)  # 2.5 -> 2 (half to even), 0.83 -> 1
    # FixedSizeCrop: one fraction for both axes
    assert lsj_crop_offset((300, 500), 256, 0.5) == (22, 122)
    assert lsj_crop_offset((100, 500), 256, 0.999) == (0, 244)
    assert lsj_crop_offset((200, 200), 256, 0.7) == (0, 0)


def test_lsj_dataset_batches_have_one_view(photos):
    records = [p["record"] for p in photos]
    cfg = view_config(augmentation="lsj", lsj_scale=(0.1, 2.0))
    dataset = EntityViewsDataset(records, cfg, train=True, seed=3)
    samples = [dataset[i % 2] for i in range(6)]
    batch = collate_views(samples[:2])
    assert batch["images"].shape == (2, 1, 3, LSJ_SIZE, LSJ_SIZE)
    assert batch["crop_boxes"].shape == (2, 1, 4)
    assert batch["image_sizes"].shape == (2, 2)
    assert all(len(t) == 1 for t in batch["targets"])
    for sample in samples:
        h, w = sample["image_size"]
        assert 0 < h <= LSJ_SIZE and 0 < w <= LSJ_SIZE
        [target] = sample["targets"]
        assert target["masks"].shape[1:] == (LSJ_SIZE, LSJ_SIZE)
        assert target["masks"].flatten(1).any(1).all()
        assert not target["masks"][:, h:].any() and not target["masks"][:, :, w:].any()
    assert len({s["image_size"] for s in samples}) > 1  # the scale varies


@pytest.mark.parametrize("crop_resize", ["same", "own"])
def test_crop_views_dataset_matches_its_draws(photos, crop_resize):
    """The dataset's sample equals the deterministic sample made from the same draws."""
    records = [p["record"] for p in photos]
    cfg = view_config(crop_resize=crop_resize, short_sizes=(128, 160))
    dataset = EntityViewsDataset(records, cfg, train=True, seed=1)
    for index in range(4):
        rng = np.random.default_rng(index)
        sample = dataset._make_sample(records[index % 2], rng)
        rng = np.random.default_rng(index)  # replay the draws
        short = int(rng.choice(cfg.short_sizes))
        flipped = bool(rng.random() < cfg.flip_prob)
        photo = photos[index % 2]
        boxes = crop_boxes(*photo["image"].shape[:2], "fixed4", 0.7, rng=rng)
        box = boxes[int(rng.integers(len(boxes)))]
        again = crop_views_sample(
            photo["image"], pairs(photo), cfg, short=short, flipped=flipped, crop_box=box
        )
        assert sample["flipped"] == flipped
        assert torch.equal(sample["images"], again["images"])
        assert sample["crop_boxes"].tolist() == again["crop_boxes"].tolist()
        for ours, theirs in zip(sample["targets"], again["targets"], strict=True):
            assert torch.equal(ours["masks"], theirs["masks"])
            assert torch.equal(ours["ids"], theirs["ids"])
    batch = collate_views([dataset[0], dataset[1]])
    expected = (2, 2, 2) if crop_resize == "own" else (2, 2)
    assert tuple(batch["image_sizes"].shape) == expected


def test_entity_targets_keep_invisible_valid_and_sizes():
    full = np.zeros((3, 4, 6), np.uint8)  # entity 10 in the full view only
    full[0, 1, 1] = 1
    crop = torch.zeros(3, 5, 5, dtype=torch.bool)  # entity 30 in the crop only; 20 nowhere
    crop[2, 0, 0] = True
    stats = Counter()
    targets = entity_targets([full, crop], [10, 20, 30], stats=stats)
    assert [t["ids"].tolist() for t in targets] == [[10, 30], [10, 30]]
    assert targets[0]["masks"].shape == (2, 4, 6) and targets[1]["masks"].shape == (2, 5, 5)
    assert targets[0]["masks"].dtype == torch.bool and targets[0]["ids"].dtype == torch.long
    assert targets[0]["masks"][0].sum() == 1 and not targets[0]["masks"][1].any()
    assert stats["entity_not_visible"] == 1

    kept = entity_targets([full, crop], [10, 20, 30], keep_invisible=True)
    assert [t["ids"].tolist() for t in kept] == [[10, 20, 30]] * 2
    assert not kept[1]["masks"][1].any()

    # a flag of 0 zeroes that view's mask: entity 30 is then nowhere and dropped
    valid = [np.array([1, 1, 1]), torch.tensor([1, 1, 0])]
    flagged = entity_targets([full, crop], [10, 20, 30], valid=valid)
    assert [t["ids"].tolist() for t in flagged] == [[10], [10]]
    flagged = entity_targets([full, crop], [10, 20, 30], keep_invisible=True, valid=valid)
    assert not flagged[1]["masks"][2].any()

    empty = entity_targets([np.zeros((0, 4, 6)), np.zeros((0, 5, 5))], [])
    assert [tuple(t["masks"].shape) for t in empty] == [(0, 4, 6), (0, 5, 5)]
    with pytest.raises(ValueError, match="do not match"):
        entity_targets([full, crop[:2]], [10, 20, 30])


def test_pil_nearest_index_is_pillow():
    from PIL import Image

    for source, target in [(640, 240), (427, 160), (448, 241), (360, 143), (7, 33), (4000, 1333)]:
        row = np.arange(source, dtype=np.int32)[None]
        resized = np.asarray(Image.fromarray(row, mode="I").resize((target, 1), Image.NEAREST))
        assert np.array_equal(pil_nearest_index(source, target), resized[0])


def test_compare_crop_resize_script_prints_both_photos(shared_data):
    from conftest import run_python

    result = run_python("scripts/compare_crop_resize.py", "--shared", shared_data, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0000")]
    assert [row.split("|")[2:4] for row in rows] == [
        [" 160 x 240 ", " 160 x 241 "],
        [" 144 x 256 ", " 143 x 256 "],
    ]
