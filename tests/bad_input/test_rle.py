"""Malformed RLE is refused in one line before pycocotools decodes it (into garbage, past its
buffer, or in an endless IoU loop), and well-formed RLE decodes exactly as pycocotools does."""

from __future__ import annotations

import json
import multiprocessing
import time

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from entityseg.data.coco_entity import decode_entity_mask
from entityseg.data.errors import EntityDataError
from entityseg.data.rle import check_rle
from entityseg.evaluation.entity_ap import evaluate

H, W = 32, 40


def naive_runs(mask: np.ndarray) -> list[int]:
    """COCO's run lengths of a binary mask, column-major, starting with a run of zeros."""
    runs, value, length = [], 0, 0
    for pixel in mask.flatten(order="F").tolist():
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    return [*runs, length]


def compressed(runs: list[int], height: int, width: int) -> str:
    """pycocotools' own compressed string of ``runs`` (it encodes without checking the sum)."""
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return rle["counts"].decode()


def random_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # empty or full
        return np.full((height, width), rng.integers(2), dtype=np.uint8)
    if kind == 1:  # one box
        mask = np.zeros((height, width), dtype=np.uint8)
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        mask[y0 : rng.integers(y0, height + 1), x0 : rng.integers(x0, width + 1)] = 1
        return mask
    return (rng.random((height, width)) < rng.random()).astype(np.uint8)  # noise, any density


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_pycocotools_rle_is_accepted_and_decoded_exactly():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = random_mask(rng, height, width)
        rle = mask_utils.encode(np.asfortranarray(mask))
        runs = naive_runs(mask_utils.decode(rle))  # pycocotools' own decoding, as runs
        assert runs == naive_runs(mask)
        for counts in (rle["counts"], rle["counts"].decode(), runs):
            segmentation = {"size": [height, width], "counts": counts}
            assert check_rle(segmentation, height, width).tolist() == runs


def test_long_runs_and_negative_deltas_decode_exactly():
    """Numbers of up to 6 characters (30 bits): large images, never allocated here."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        runs = [int(v) for v in rng.integers(0, 2**26, size=int(rng.integers(1, 12)))]
        runs[0] %= 16  # one short number: pycocotools' encoder overflows its buffer by one
        # byte when every number takes 6 characters
        width = int(rng.integers(1, 50))
        runs[-1] += -sum(runs) % width  # a whole number of columns
        height = sum(runs) // width
        if height == 0:
            continue
        segmentation = {"size": [height, width], "counts": compressed(runs, height, width)}
        assert check_rle(segmentation, height, width).tolist() == runs


def test_counts_that_do_not_sum_to_the_image_are_refused():
    rng = np.random.default_rng(2)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 30, size=2))
        runs = naive_runs(random_mask(rng, height, width))
        index = int(rng.integers(len(runs)))
        change = int(rng.choice([-1, 1]) * rng.integers(1, 50))
        runs[index] = max(runs[index] + change, 0)
        if sum(runs) == height * width:
            continue
        message = f"RLE counts sum to {sum(runs)}, not {height} x {width} = {height * width}"
        for counts in (runs, compressed(runs, height, width)):
            with pytest.raises(ValueError) as info:
                check_rle({"size": [height, width], "counts": counts}, height, width)
            assert str(info.value) == message


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ("zzzzzzzz", "RLE counts: character 'z' at position 0 is not one of '0'..'o'"),
        ("1/1", "RLE counts: character '/' at position 1 is not one of '0'..'o'"),
        ("1\u00e91", "RLE counts: character '\u00e9' at position 1 is not one of '0'..'o'"),
        (b"1\x001", "RLE counts: character '\\x00' at position 1 is not one of '0'..'o'"),
        ("1P", "RLE counts end in the middle of a number"),  # 'P': continuation bit
        ("PPPPPP0", "RLE counts: number 0 is longer than 6 characters"),
        ("O", "RLE counts: run 0 decodes to -1, below 0"),  # 'O': 15 with the sign bit
        ("0000O", "RLE counts: run 4 decodes to -1, below 0"),  # delta -1 to run 2 = 0
        ([3, -1, 2], "RLE counts: run 1 is -1, not an integer >= 0"),
        ([3, 1.5, 2], "RLE counts: run 1 is 1.5, not an integer >= 0"),
        ([3, True, 2], "RLE counts: run 1 is true, not an integer >= 0"),
        (7, "RLE counts must be a string (compressed) or a list of integers (uncompressed), not 7"),
    ],
)
def test_malformed_counts_are_named(counts, message):
    with pytest.raises(ValueError) as info:
        check_rle({"size": [3, 4], "counts": counts}, 3, 4)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ({"size": [3, 5], "counts": "<"}, "RLE size [3, 5] disagrees with image size [3, 4]"),
        ({"size": [3], "counts": "<"}, "RLE size must be two integers [height, width], not a list"),
        ({"counts": "<"}, "RLE without 'size' and 'counts'"),
    ],
)
def test_malformed_size_is_named(segmentation, message):
    assert check_rle({"size": [3, 4], "counts": "<"}, 3, 4).tolist() == [12]
    with pytest.raises(ValueError) as info:
        check_rle(segmentation, 3, 4)
    assert str(info.value) == message


def short_runs() -> list[int]:
    """The runs of a box, 10 pixels short of the 32 x 40 image."""
    runs = naive_runs(box_mask(2, 12, 3, 15))
    runs[-1] -= 10
    return runs


@pytest.mark.parametrize("form", ["compressed", "uncompressed"])
def test_ground_truth_rle_with_a_wrong_sum_is_refused_by_the_data_reader(form):
    runs = short_runs()
    counts = compressed(runs, H, W) if form == "compressed" else runs
    annotation = {"id": 7, "segmentation": {"size": [H, W], "counts": counts}}
    with pytest.raises(EntityDataError) as info:
        decode_entity_mask(annotation, H, W, "gt.json (image a.png)")
    assert str(info.value) == (
        "gt.json (image a.png): annotation 7: RLE counts sum to 1270, not 32 x 40 = 1280"
    )


def good_segmentation() -> dict:
    rle = mask_utils.encode(np.asfortranarray(box_mask(15, 30, 5, 20)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def gt_with(segmentation: dict) -> dict:
    """One 32 x 40 image: a good entity (id 1) and ``segmentation`` (id 2)."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": [
            {
                "id": ann_id,
                "image_id": 1,
                "category_id": 1,
                "segmentation": segm,
                "area": 120.0,
                "iscrowd": 0,
            }
            for ann_id, segm in [
                (1, good_segmentation()),
                (2, segmentation),
            ]
        ],
    }


@pytest.mark.parametrize("form", ["compressed", "uncompressed"])
def test_ground_truth_rle_with_a_wrong_sum_is_refused_by_entity_ap(tmp_path, form):
    runs = short_runs()
    counts = compressed(runs, H, W) if form == "compressed" else runs
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_with({"size": [H, W], "counts": counts})))
    with pytest.raises(EntityDataError) as info:
        evaluate(gt_path, [])
    assert str(info.value) == f"{gt_path}: annotation 2: RLE counts sum to 1270, not 32 x 40 = 1280"


def in_forked_child(function, deadline_s: float) -> tuple[str | None, float]:
    """Run ``function()`` in a forked child (pycocotools' C loops cannot be interrupted in this
    process): its error message or None, and the seconds it took; fails after ``deadline_s``."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        start = time.perf_counter()
        try:
            function()
            message = None
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
        send.send((message, time.perf_counter() - start))

    process = context.Process(target=child)
    process.start()
    try:
        if not receive.poll(deadline_s):
            pytest.fail(f"still running after {deadline_s} s")
        return receive.recv()
    finally:
        process.kill()
        process.join()


def test_hostile_prediction_counts_are_refused_at_once(tmp_path):
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_with(good_segmentation())))
    hostile = {"image_id": 1, "segmentation": {"size": [H, W], "counts": "zzzzzzzz"}, "score": 0.9}
    message, seconds = in_forked_child(lambda: evaluate(gt_path, [hostile]), deadline_s=60)
    assert message == (
        "EntityDataError: predictions: prediction 0 (image 1): RLE counts: character 'z' at "
        "position 0 is not one of '0'..'o'"
    )
    assert seconds < 0.5
