"""AP^e must be exactly a plain class-agnostic pycocotools run, in percent, NaN for its -1."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import run_python
from entityseg.evaluation.entity_ap import (
    METRIC_NAMES,
    RANK_STATE,
    STATE_NAMES,
    EntityAP,
    class_agnostic_results,
    decode_predictions,
    drop_padding,
    evaluate,
    main,
)

SMALL = (32, 40)
BIG = (128, 120)

# (image id, (height, width), [(y0, y1, x0, x1, category id, iscrowd)]); categories differ on
# purpose, image 2 has no ground truth, image 3 gets more than 100 predictions, image 4 holds
# the medium and large entities.
SCENES = [
    (1, SMALL, [(2, 12, 3, 15, 3, 0), (15, 30, 5, 20, 7, 0), (4, 10, 25, 38, 12, 0),
                (18, 30, 24, 39, 5, 1)]),
    (2, SMALL, []),
    (3, SMALL, [(y, y + 6, x, x + 8, 20 + y + x, 0) for y in (2, 12, 22) for x in (3, 20)]),
    (4, BIG, [(5, 105, 5, 105, 2, 0), (108, 126, 10, 90, 9, 0), (110, 120, 100, 115, 4, 0)]),
]  # fmt: skip


def box_mask(size: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def gt_json(scenes) -> dict:
    images, annotations = [], []
    for image_id, size, boxes in scenes:
        height, width = size
        images.append({"id": image_id, "file_name": "x.png", "height": height, "width": width})
        for y0, y1, x0, x1, category_id, iscrowd in boxes:
            segmentation = rle(box_mask(size, y0, y1, x0, x1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(segmentation)),
                    "bbox": [float(v) for v in mask_utils.toBbox(segmentation)],
                    "iscrowd": iscrowd,
                }
            )
    categories = sorted({a["category_id"] for a in annotations})
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gt") / "gt.json"
    path.write_text(json.dumps(gt_json(SCENES)))
    return path


@pytest.fixture(scope="module")
def small_only_gt_path(tmp_path_factory) -> Path:
    """Images 1 and 2 only: no medium or large entity, so APm and APl are undefined."""
    path = tmp_path_factory.mktemp("gt_small") / "gt.json"
    path.write_text(json.dumps(gt_json(SCENES[:2])))
    return path


def reference(gt_path: Path, predictions: list[dict]) -> dict[str, float]:
    """The plain pycocotools run that AP^e is defined as (-1 kept as pycocotools says it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        for ann in gt.dataset["annotations"]:
            ann["category_id"] = 1
        gt.dataset["categories"] = [{"id": 1, "name": "entity"}]
        gt.createIndex()
        results = [
            {**{k: v for k, v in p.items() if k != "bbox"}, "category_id": 1}
            for p in copy.deepcopy(predictions)
        ]
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
        evaluator.params.imgIds = gt.getImgIds()
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: evaluator.stats[i] * 100 for i, name in enumerate(METRIC_NAMES)}


def assert_same(result: dict[str, float], expected: dict[str, float]) -> None:
    """Exact equality, NaN in ``result`` standing for pycocotools' -1 (x100) in ``expected``."""
    assert list(result) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        if expected[name] == -100:
            assert math.isnan(result[name]), name
        else:
            assert result[name] == expected[name], name


def gt_entities(crowd: bool = False) -> list[tuple[int, np.ndarray]]:
    return [
        (image_id, box_mask(size, y0, y1, x0, x1))
        for image_id, size, boxes in SCENES
        for y0, y1, x0, x1, _, iscrowd in boxes
        if bool(iscrowd) == crowd
    ]


def coco_result(image_id: int, mask: np.ndarray, score: float, **extra) -> dict:
    """One COCO result (no ``category_id`` unless given: AP^e does not need one)."""
    return {"image_id": image_id, "segmentation": rle(mask), "score": score, **extra}


def perfect_predictions() -> list[dict]:
    return [coco_result(image_id, mask, 1.0, category_id=1) for image_id, mask in gt_entities()]


def noisy_predictions(seed: int = 0) -> list[dict]:
    """Shifted copies of the entities (some exact), false positives, shuffled scores."""
    rng = np.random.default_rng(seed)
    sizes = {image_id: size for image_id, size, _ in SCENES}
    predictions = []
    for image_id, mask in gt_entities():
        dy, dx = rng.integers(-4, 5, size=2)
        shifted = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        predictions.append(coco_result(image_id, shifted, float(rng.random()), category_id=99))
    for image_id in (1, 2, 3, 4, 2):
        h, w = sizes[image_id]
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        fp = box_mask((h, w), y0, y0 + 7, x0, x0 + 9)
        predictions.append(coco_result(image_id, fp, float(rng.random())))
    rng.shuffle(predictions)
    return predictions


def test_perfect_predictions_score_100_where_defined(gt_path, small_only_gt_path):
    # pycocotools divides by tp + fp + eps, so an area range with one entity (APm, APl here)
    # gives 1 / (1 + eps): 100 up to the last bit.
    result = evaluate(gt_path, perfect_predictions())
    assert result == pytest.approx(dict.fromkeys(METRIC_NAMES, 100.0), rel=1e-12)
    assert_same(result, reference(gt_path, perfect_predictions()))
    small_only = [p for p in perfect_predictions() if p["image_id"] <= 2]
    result = evaluate(small_only_gt_path, small_only)
    assert [result[k] for k in ("AP", "AP50", "AP75", "APs")] == pytest.approx([100.0] * 4)
    assert math.isnan(result["APm"]) and math.isnan(result["APl"])


def test_no_predictions_score_0_where_defined(gt_path, small_only_gt_path):
    assert evaluate(gt_path, []) == dict.fromkeys(METRIC_NAMES, 0.0)
    result = evaluate(small_only_gt_path, [])
    assert [result[k] for k in ("AP", "AP50", "AP75", "APs")] == [0.0] * 4
    assert math.isnan(result["APm"]) and math.isnan(result["APl"])


def test_missing_images_count_as_misses(gt_path):
    without_image_4 = [p for p in perfect_predictions() if p["image_id"] != 4]
    result = evaluate(gt_path, without_image_4)
    assert result["AP"] < 100.0 and result["APm"] == 0.0 and result["APl"] == 0.0
    assert_same(result, reference(gt_path, without_image_4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_predictions_equal_plain_pycocotools(gt_path, seed):
    predictions = noisy_predictions(seed)
    before = copy.deepcopy(predictions)
    result = evaluate(gt_path, predictions)
    assert predictions == before  # the caller's dicts are not touched
    assert 0.0 < result["AP"] < 100.0
    assert_same(result, reference(gt_path, predictions))


def test_categories_are_ignored(gt_path):
    predictions = perfect_predictions()
    for k, prediction in enumerate(predictions):
        prediction["category_id"] = 1000 + k
    assert evaluate(gt_path, predictions)["AP"] == 100.0


def test_crowd_regions_are_ignored(gt_path):
    [(crowd_image, crowd_mask)] = gt_entities(crowd=True)
    on_crowd = coco_result(crowd_image, crowd_mask, 1.0)
    half_crowd = coco_result(crowd_image, np.roll(crowd_mask, 7, axis=1), 0.9)
    predictions = perfect_predictions() + [on_crowd, half_crowd]
    result = evaluate(gt_path, predictions)
    assert result["AP"] == 100.0  # a detection inside the crowd region is no false positive
    assert_same(result, reference(gt_path, predictions))
    mixed = noisy_predictions(3) + [on_crowd, half_crowd]
    assert_same(evaluate(gt_path, mixed), reference(gt_path, mixed))


def test_more_than_100_predictions_keep_the_top_100(gt_path):
    rng = np.random.default_rng(7)
    scores = rng.permutation(200)[:130] / 200 + 0.001  # distinct, so the top 100 is unambiguous
    crowded = []
    for k, score in enumerate(scores):
        y0, x0 = int(rng.integers(0, 26)), int(rng.integers(0, 32))
        mask = box_mask(SMALL, y0, y0 + 6, x0, x0 + 8)
        crowded.append(coco_result(3, mask, float(score)))
        if k < 6:  # the exact entities, some ranked inside the top 100 and some outside
            _, exact = [e for e in gt_entities() if e[0] == 3][k]
            crowded[-1]["segmentation"] = rle(exact)
    others = [p for p in noisy_predictions(4) if p["image_id"] != 3]
    predictions = others + crowded
    result = evaluate(gt_path, predictions)
    assert_same(result, reference(gt_path, predictions))
    top_100 = sorted(crowded, key=lambda p: -p["score"])[:100]
    assert evaluate(gt_path, others + top_100) == result


def test_bbox_is_dropped_and_counts_may_be_bytes(gt_path):
    predictions = noisy_predictions(5)
    with_bbox = [{**p, "bbox": [0.0, 0.0, 40.0, 32.0]} for p in predictions]
    as_bytes = [
        {**p, "segmentation": {**p["segmentation"], "counts": p["segmentation"]["counts"].encode()}}
        for p in predictions
    ]
    result = evaluate(gt_path, predictions)
    assert evaluate(gt_path, with_bbox) == result
    assert evaluate(gt_path, as_bytes) == result


def test_results_json_path_is_accepted(gt_path, tmp_path):
    predictions = noisy_predictions(6)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(predictions))
    assert evaluate(gt_path, results_path) == evaluate(gt_path, predictions)
    assert evaluate(str(gt_path), str(results_path)) == evaluate(gt_path, predictions)


def test_unknown_image_ids_are_named(gt_path):
    predictions = perfect_predictions()
    predictions += [{**predictions[0], "image_id": 77}, {**predictions[0], "image_id": 9}]
    with pytest.raises(ValueError, match=r"not in the ground truth .*gt\.json: \[9, 77\]"):
        evaluate(gt_path, predictions)


def test_wrong_mask_size_and_malformed_predictions_are_rejected(gt_path):
    wrong_size = coco_result(4, np.ones(SMALL, np.uint8), 0.5)
    with pytest.raises(ValueError, match=r"mask size \[32, 40\] is not the image's \[128, 120\]"):
        evaluate(gt_path, [wrong_size])
    with pytest.raises(ValueError, match=r"prediction 0 lacks \['score'\]"):
        evaluate(gt_path, [{"image_id": 1, "segmentation": wrong_size["segmentation"]}])
    with pytest.raises(ValueError, match="compressed RLE"):
        evaluate(gt_path, [{"image_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]], "score": 1}])


def test_bad_annotation_ids_are_rejected(tmp_path):
    data = gt_json(SCENES[:1])
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="dup.json: annotation 1: annotation id is not unique"):
        evaluate(path, [])


def test_pycocotools_output_only_when_verbose(gt_path, capsys):
    evaluate(gt_path, perfect_predictions())
    assert capsys.readouterr().out == ""
    evaluate(gt_path, perfect_predictions(), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_cli_prints_one_json_line(gt_path, tmp_path):
    predictions = noisy_predictions(8)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(predictions))
    command = ["-m", "entityseg.evaluation.entity_ap", gt_path]
    done = run_python(*command, results_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert json.loads(done.stdout) == evaluate(gt_path, predictions)

    missing = tmp_path / "missing_results.json"
    done = run_python(*command, missing)
    assert done.returncode == 2
    assert str(missing) in done.stderr and done.stderr.count("\n") == 1


def test_cli_rejects_non_json_and_writes_nan_as_null(gt_path, small_only_gt_path, tmp_path, capsys):
    not_json = tmp_path / "notes.json"
    not_json.write_text("this is not json\n")
    assert main([str(not_json), str(not_json)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(not_json) in captured.err
    assert captured.err.count("\n") == 1

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main([str(small_only_gt_path), str(empty)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": None, "APl": None}


def test_metric_over_batches_equals_evaluate(gt_path):
    predictions = noisy_predictions(9)
    metric = EntityAP(gt_path)
    for batch in (predictions[:3], [], predictions[3:10], predictions[10:]):
        metric.update(batch)
    assert metric.compute() == evaluate(gt_path, predictions)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute() == evaluate(gt_path, [])


def test_identical_predictions_of_one_image_are_all_scored(gt_path):
    """``overlapping=true`` can predict the same mask twice: both count (no dedup by value)."""
    predictions = noisy_predictions(4)
    repeated = [p for p in predictions if p["image_id"] == predictions[0]["image_id"]]
    assert evaluate(gt_path, predictions + repeated) != evaluate(gt_path, predictions)
    metric = EntityAP(gt_path)
    metric.update(predictions)
    metric.update(repeated)  # the same rank: not padding
    assert metric.compute() == evaluate(gt_path, predictions + repeated)


def test_padding_is_an_image_scored_on_a_second_rank(gt_path, monkeypatch):
    """What the distributed sampler repeats comes back from another rank: dropped by image."""
    from entityseg.evaluation import entity_ap

    predictions = noisy_predictions(4)
    first = predictions[0]["image_id"]
    repeated = [p for p in predictions if p["image_id"] == first]
    ranks = []
    for rank, batch in enumerate([predictions, repeated]):
        monkeypatch.setattr(entity_ap, "_current_rank", lambda rank=rank: rank)
        metric = EntityAP(gt_path)
        metric.update(batch)
        ranks.append(metric)
    synced = EntityAP(gt_path)
    synced.update([])
    for name in (*STATE_NAMES, RANK_STATE):  # what ``_sync_dist`` leaves behind
        setattr(synced, name, torch.cat([torch.cat(getattr(r, name)) for r in ranks]))
    assert synced.compute() == evaluate(gt_path, predictions)
    kept = drop_padding(predictions + repeated, [0] * len(predictions) + [1] * len(repeated))
    assert kept == predictions


def test_metric_state_round_trip_keeps_order_and_values():
    predictions = noisy_predictions(10)
    given = copy.deepcopy(predictions)
    given[0]["segmentation"]["counts"] = given[0]["segmentation"]["counts"].encode()
    metric = EntityAP("unused.json")
    metric.update(given[:4])
    metric.update(given[4:])
    states = {name: torch.cat(getattr(metric, name)) for name in STATE_NAMES}
    assert decode_predictions(states) == class_agnostic_results(predictions)  # counts as str


def test_metric_after_simulated_all_gather_evaluates_the_union(gt_path):
    """torchmetrics' sync concatenates each rank's list, gathers, and ``cat``s rank after rank."""
    predictions = noisy_predictions(11)
    rank_batches = [[predictions[:2], predictions[2:9]], [[], predictions[9:]]]
    ranks = []
    for batches in rank_batches:
        metric = EntityAP(gt_path)
        for batch in batches:
            metric.update(batch)
        ranks.append(metric)
    gathered = {
        name: torch.cat([torch.cat(getattr(rank, name)) for rank in ranks])
        for name in (*STATE_NAMES, RANK_STATE)
    }
    assert decode_predictions(gathered) == class_agnostic_results(predictions)
    synced = EntityAP(gt_path)
    synced.update([])
    for name, value in gathered.items():
        setattr(synced, name, value)  # what ``_sync_dist`` leaves behind
    assert synced.compute() == evaluate(gt_path, predictions)


def _ddp_worker(rank: int, init_file: str, gt_path: str, shards, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        metric = EntityAP(gt_path)
        for batch in shards[rank]:
            metric.update(batch)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(metric.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_syncs_over_two_gloo_processes(gt_path, tmp_path):
    predictions = noisy_predictions(12)
    # each image on one rank, as the sampler deals them; rank 1 also scores a repeat of one of
    # rank 0's images: the sampler's padding
    images = sorted({p["image_id"] for p in predictions})
    on_rank_0 = [p for p in predictions if p["image_id"] in images[: len(images) // 2]]
    on_rank_1 = [p for p in predictions if p["image_id"] in images[len(images) // 2 :]]
    padding = [p for p in on_rank_0 if p["image_id"] == on_rank_0[0]["image_id"]]
    shards = [[on_rank_0[:3], on_rank_0[3:]], [[], on_rank_1 + padding]]
    mp.spawn(
        _ddp_worker,
        args=(str(tmp_path / "store"), str(gt_path), shards, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    expected = evaluate(gt_path, predictions)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == expected
