"""AP^e's inputs are checked before pycocotools sees them: one line naming the file (or
``predictions``) and the problem, never a TypeError or KeyError; metrics files hold ``null``
where AP^e is NaN, never a bare ``NaN``."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from conftest import REPO, run_python
from entityseg.data.errors import EntityDataError
from entityseg.evaluation.entity_ap import METRIC_NAMES, evaluate, metrics_json
from entityseg.inference.writing import image_ids_from_gt

H, W = 32, 40


def box_rle(y0: int, y1: int, x0: int, x1: int) -> dict:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def ground_truth(num_entities: int = 2) -> dict:
    """One 32 x 40 image (id 1) with ``num_entities`` box entities, as COCO writes them."""
    annotations = [
        {
            "id": k + 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": box_rle(2 + 10 * k, 10 + 10 * k, 3, 15),
            "area": 96.0,
            "bbox": [3.0, 2.0 + 10 * k, 12.0, 8.0],
            "iscrowd": 0,
        }
        for k in range(num_entities)
    ]
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "entity"}],
    }


@pytest.fixture
def gt_path(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth()))
    return path


def prediction(**fields) -> dict:
    return {"image_id": 1, "segmentation": box_rle(2, 10, 3, 15), "score": 0.9, **fields}


def refusal(function, *args) -> str:
    """The message of the :class:`EntityDataError` that ``function(*args)`` raises."""
    with pytest.raises(EntityDataError) as info:
        function(*args)
    return str(info.value)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"score": None}, "prediction 0 (image 1): 'score' must be a finite number, not null"),
        ({"score": math.nan}, "prediction 0 (image 1): 'score' must be a finite number, not nan"),
        ({"score": math.inf}, "prediction 0 (image 1): 'score' must be a finite number, not inf"),
        ({"score": "0.9"}, "prediction 0 (image 1): 'score' must be a finite number, not '0.9'"),
        ({"image_id": [1]}, "prediction 0: 'image_id' must be an integer, not a list"),
        ({"image_id": True}, "prediction 0: 'image_id' must be an integer, not true"),
    ],
)
def test_bad_predictions_are_named(gt_path, fields, problem):
    predictions = [prediction(), prediction(**fields)]
    problem = problem.replace("prediction 0", "prediction 1")
    assert refusal(evaluate, gt_path, predictions) == f"predictions: {problem}"


def test_nan_score_in_a_results_file_names_the_file(gt_path, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([prediction(score=math.nan)]))  # json.dumps writes NaN
    assert refusal(evaluate, gt_path, results) == (
        f"{results}: prediction 0 (image 1): 'score' must be a finite number, not nan"
    )


def without(data: dict, part: str, key: str) -> dict:
    """``data`` with ``key`` removed from the first entry of ``data[part]``."""
    del data[part][0][key]
    return data


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (without(ground_truth(), "annotations", "area"), "annotation 1: lacks ['area']"),
        (without(ground_truth(), "images", "height"), "image entry 0 lacks ['height']"),
        (
            {**ground_truth(), "images": [{"id": [1], "height": H, "width": W}]},
            "image entry 0: 'id' must be an integer, not a list",
        ),
        (
            {**ground_truth(), "images": [{"id": 1, "height": H, "width": 0}]},
            "image 1: 'width' must be a positive integer, not 0",
        ),
    ],
)
def test_bad_ground_truth_is_named(tmp_path, data, problem):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    assert refusal(evaluate, path, [prediction()]) == f"{path}: {problem}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read: No such file or directory"),
        ("this is not json\n", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        ("[]", "not a COCO json: expected an object with an 'images' list"),
        ('{"images": {}}', "not a COCO json: expected an object with an 'images' list"),
    ],
)
def test_unusable_ground_truth_files_are_named_by_entity_ap_and_predict(tmp_path, content, problem):
    path = tmp_path / "gt.json"
    if content is not None:
        path.write_text(content)
    assert refusal(evaluate, path, []) == f"{path}: {problem}"
    assert refusal(image_ids_from_gt, str(path)) == f"{path}: {problem}"


def test_predict_reads_image_ids_from_checked_ground_truth(tmp_path):
    path = tmp_path / "gt.json"
    data = ground_truth()
    data["images"].append({"id": 5, "file_name": "photos/b.jpg", "height": H, "width": W})
    path.write_text(json.dumps(data))
    assert image_ids_from_gt(str(path)) == {"a.png": 1, "b.jpg": 5}
    data["images"][1]["file_name"] = "other/a.png"
    path.write_text(json.dumps(data))
    assert refusal(image_ids_from_gt, str(path)) == f"{path}: images 1 and 5 are both named 'a.png'"
    path.write_text(json.dumps(without(data, "annotations", "area")))
    assert refusal(image_ids_from_gt, str(path)) == f"{path}: annotation 1: lacks ['area']"


def test_cli_names_a_null_score_in_one_line(gt_path, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([prediction(score=None)]))
    done = run_python("-m", "entityseg.evaluation.entity_ap", gt_path, results, timeout=300)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: {results}: prediction 0 (image 1): 'score' must be a finite number, not null"
    ]


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN`` and ``Infinity``, which are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} in a metrics file")

    return json.loads(text, parse_constant=refuse)


def test_nan_ap_is_written_as_null(tmp_path):
    gt_path = tmp_path / "no_entities.json"
    gt_path.write_text(json.dumps(ground_truth(num_entities=0)))
    metrics = evaluate(gt_path, [prediction()])
    assert all(math.isnan(metrics[name]) for name in METRIC_NAMES)
    # what entityseg.evaluate writes: table7.json (rows) and metrics.json (flat)
    rows = [{"mode": "batch_oc", **metrics, "forward_ms": 12.5}]
    flat = {f"test/{name.lower()}_batch_oc": metrics[name] for name in ("AP", "AP50", "AP75")}
    (tmp_path / "table7.json").write_text(metrics_json(rows, indent=2))
    (tmp_path / "metrics.json").write_text(metrics_json(flat, indent=2, sort_keys=True))
    table7 = strict_json((tmp_path / "table7.json").read_text())
    assert table7 == [{"mode": "batch_oc", **dict.fromkeys(METRIC_NAMES), "forward_ms": 12.5}]
    assert strict_json((tmp_path / "metrics.json").read_text()) == dict.fromkeys(flat)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        metrics_json({"AP": math.inf})


def test_collect_tables_shows_a_null_ap_as_nan():
    spec = importlib.util.spec_from_file_location(
        "collect_tables", REPO / "scripts/collect_tables.py"
    )
    collect_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect_tables)
    metrics = {"val/ap_batch_oc": None, "val/ap50_batch_oc": None, "val/ap75_batch_oc": 12.34}
    runs = [({"data.crop_delta": "0.6"}, metrics), ({"data.crop_delta": "0.7"}, metrics)]
    assert collect_tables.metric_split(runs, "auto", "batch_oc") == "val"
    _, rows = collect_tables.table(runs, "val")
    assert rows == [["0.6", "nan", "nan", "12.3", "40.2"], ["0.7", "nan", "nan", "12.3", "41.0"]]
