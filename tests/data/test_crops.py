import numpy as np
import pytest
import torch

from entityseg.data.crops import crop_and_resize, crop_boxes


def release_grid(height, width, ratio, stride_ratio=0.6):
    """The release's EntityCrop.get_crop_axises, written out naively."""
    crop_w, crop_h = int(ratio * width), int(ratio * height)
    stride_w, stride_h = int(stride_ratio * width), int(stride_ratio * height)
    boxes = []
    for start_h in range(0, height, stride_h):
        for start_w in range(0, width, stride_w):
            end_h = min(start_h + crop_h, height)
            end_w = min(start_w + crop_w, width)
            boxes.append((end_w - crop_w, end_h - crop_h, end_w, end_h))
    return boxes


@pytest.mark.parametrize("delta", [0.5, 0.6, 0.7, 0.8, 1.0])
@pytest.mark.parametrize(
    "size", [(427, 640), (360, 640), (768, 1024), (3000, 4000), (5, 7), (33, 17)]
)
def test_fixed4_is_the_release_grid(size, delta):
    height, width = size
    boxes = crop_boxes(height, width, "fixed4", delta)
    assert boxes == release_grid(height, width, delta)
    assert len(boxes) == 4
    cw, ch = int(delta * width), int(delta * height)
    assert boxes[0] == (0, 0, cw, ch)  # top-left, top-right, bottom-left, bottom-right
    assert boxes[3] == (width - cw, height - ch, width, height)


def test_fixed4_matches_the_release_outputs(shared_data):
    outputs = torch.load(
        shared_data / "official_reference/cropformer_tiny/outputs.pt", weights_only=True
    )
    for index, size in ((0, (427, 640)), (1, (360, 640))):
        expected = [tuple(b) for b in outputs[f"{index}.crop_region"].tolist()]
        assert crop_boxes(*size, "fixed4", 0.7) == expected


def test_fixed8_adds_edge_centres():
    boxes = crop_boxes(100, 200, "fixed8", 0.7)
    assert boxes[:4] == crop_boxes(100, 200, "fixed4", 0.7)
    assert boxes[4:] == [(30, 0, 170, 70), (0, 15, 140, 85), (60, 15, 200, 85), (30, 30, 170, 100)]


def test_random_boxes_are_inside_and_vary():
    rng = np.random.default_rng(0)
    boxes = [crop_boxes(300, 400, "random", 0.7, rng=rng)[0] for _ in range(50)]
    assert all(x0 >= 0 and y0 >= 0 and x1 <= 400 and y1 <= 300 for x0, y0, x1, y1 in boxes)
    assert all((x1 - x0, y1 - y0) == (280, 210) for x0, y0, x1, y1 in boxes)
    assert len(set(boxes)) > 10
    ranged = [crop_boxes(300, 400, "random", (0.5, 0.9), rng=rng)[0] for _ in range(50)]
    assert len({x1 - x0 for x0, _, x1, _ in ranged}) > 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layout="fixed5"), "unknown crop layout 'fixed5'"),
        (dict(delta=1.5), "delta=1.5 is outside (0, 1]"),
        (dict(delta=0.0), "outside (0, 1]"),
        (dict(layout="random"), "needs a numpy Generator"),
    ],
)
def test_bad_crop_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        crop_boxes(100, 100, **kwargs)


def test_tiny_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        crop_boxes(3, 100)


def test_crop_and_resize_at_crop_size_is_the_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    box = (10, 5, 52, 33)
    assert np.array_equal(crop_and_resize(image, box, (28, 42)), image[5:33, 10:52])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("out_size", [(37, 53), (100, 90), (13, 200), (24, 30)])
def test_mask_resize_is_pillow_nearest(out_size, flip):
    """The release resizes masks with Pillow's nearest (after its flip): the same pixels,
    ties included (a 48 x 80 crop to 24 x 30 has them; OpenCV's nearest-exact differs there)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    masks = (rng.random((2, 61, 83)) > 0.5).astype(np.uint8)
    box = (3, 9, 83, 57)  # 80 x 48
    ours = crop_and_resize(masks, box, out_size, is_mask=True, flip=flip)
    source = masks[:, :, ::-1] if flip else masks
    for mask, resized in zip(source, ours, strict=True):
        crop = Image.fromarray(np.ascontiguousarray(mask[9:57, 3:83]))
        expected = np.asarray(crop.resize(out_size[::-1], Image.Resampling.NEAREST))
        assert np.array_equal(resized, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_image_crop_with_flip_is_the_crop_of_the_mirrored_image(flip):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    box = (10, 5, 52, 33)
    source = image[:, ::-1].copy() if flip else image
    expected = crop_and_resize(source, box, (17, 23))
    assert np.array_equal(crop_and_resize(image, box, (17, 23), flip=flip), expected)
