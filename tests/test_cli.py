"""evaluate and predict end to end on a tiny random-weights model and synthetic images."""

import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from pycocotools.coco import COCO

from conftest import REPO, collected_table, pycocotools_ap, run_python
from entityseg.inference.inputs import check_unique_outputs, find_inputs
from entityseg.inference.shards import read_shards
from entityseg.inference.writing import InputError

SMALL_DATA = [
    "data.num_workers=0",
    "data.synthetic.num_train=1",
    "data.synthetic.num_val=2",
    "data.synthetic.height=96",
    "data.synthetic.width=128",
    "data.size_scale=0.16",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Lightning-style checkpoint of the demo experiment's network, random weights."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["experiment=demo", "ckpt_path=x"])
    torch.manual_seed(0)
    net = instantiate(cfg.model.net)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def run(module, tmp_path, *overrides):
    return run_python(
        "-m",
        module,
        "experiment=demo",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",
        *SMALL_DATA,
        *overrides,
    )


def test_evaluate_writes_predictions_and_table7(checkpoint, tmp_path):
    result = run("entityseg.evaluate", tmp_path, f"ckpt_path={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    rows = json.loads((out / "table7.json").read_text())
    assert [r["mode"] for r in rows] == ["image_o", "batch_o", "batch_c", "batch_oc"]
    names = ["Image-O", "Batch-O", "Batch-C", "Batch-OC"]
    for number, (row, name) in enumerate(zip(rows, names, strict=True), start=1):
        # one line per mode while pycocotools scores it
        assert f"scoring mode {number}/4, {name} ({row['mode']})" in result.stdout + result.stderr
    assert "| Batch-OC |" in (out / "table7.md").read_text()
    gt_json = tmp_path / "data/synthetic/val/annotations.json"
    for row in rows:
        predictions = json.loads((out / row["predictions"]).read_text())
        assert predictions and all(p["category_id"] == 1 for p in predictions)
        assert row["forward_ms"] > 0
        # the table's AP^e is pycocotools' own on the written file (opened as it is)
        expected = pycocotools_ap(gt_json, predictions)
        assert [row[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-9)


def test_evaluate_refuses_unknown_mode_and_missing_checkpoint(checkpoint, tmp_path):
    result = run(
        "entityseg.evaluate", tmp_path, f"ckpt_path={checkpoint}", "inference.modes=[batch_x]"
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: inference.modes='batch_x': unknown inference mode; expected one of "
        "['image_o', 'batch_o', 'batch_c', 'batch_oc']"
    )
    result = run("entityseg.evaluate", tmp_path, f"ckpt_path={tmp_path}/nope.ckpt")
    assert result.returncode != 0 and "nope.ckpt: checkpoint not found" in result.stderr


def predict(checkpoint, tmp_path, images, out, *overrides):
    return run(
        "entityseg.predict",
        tmp_path,
        f"ckpt_path={checkpoint}",
        f"input={images}",
        f"output={out}",
        *overrides,
    )


PREDICTED_STEMS = ["gray", "synthetic_000000", "synthetic_000001"]  # in input (sorted) order


@pytest.fixture(scope="module")
def predicted(checkpoint, tmp_path_factory):
    """One uninterrupted ``predict`` run on two synthetic photos, a gray PNG and a broken
    JPEG: (its input folder, its output folder, the finished process)."""
    from entityseg.data.synthetic import generate_dataset

    tmp_path = tmp_path_factory.mktemp("predict")
    generate_dataset(tmp_path / "photos", num_images=2, seed=1, height=96, width=128)
    images = tmp_path / "photos" / "images"
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(images / "gray.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "predicted"
    result = predict(checkpoint, tmp_path, images, out, "inference.mode=batch_oc")
    return images, out, result


def test_predict_on_a_folder_with_a_bad_file(checkpoint, predicted, tmp_path):
    images, out, result = predicted
    assert result.returncode == 1
    assert f"{images / 'broken.jpg'}: not an image file" in result.stdout + result.stderr
    for stem in PREDICTED_STEMS:
        id_map = np.asarray(Image.open(out / f"{stem}_entities.png"))
        assert id_map.dtype == np.uint16 and id_map.max() > 0
        assert (out / f"{stem}_overlay.jpg").is_file()
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {
        "synthetic_000000.jpg",
        "synthetic_000001.jpg",
        "gray.png",
    }
    assert not list(out.glob(".*"))  # no partial picture left

    with_gt = tmp_path / "with_gt"
    result = predict(
        checkpoint,
        tmp_path,
        f"{images}/synthetic_*.jpg",
        with_gt,
        f"gt={images.parent / 'annotations.json'}",
        "inference.mode=image_o",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((with_gt / "predictions.json").read_text())
    COCO(str(images.parent / "annotations.json")).loadRes(predictions)


def test_predict_resumes_an_interrupted_run(checkpoint, predicted, tmp_path):
    images, clean, _ = predicted
    shard = clean / "predictions.rank0.jsonl"
    header, skip, *lines = shard.read_bytes().splitlines(keepends=True)
    assert json.loads(header)["settings"]["inference.mode"] == "batch_oc"
    # the unreadable broken.jpg (id 1) is recorded as skipped: every run tries it again
    assert json.loads(skip)["file_name"] == "broken.jpg" and "skipped" in json.loads(skip)
    records = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]
    assert [r["file_name"] for r in records] == [
        "gray.png",
        *(f"{s}.jpg" for s in PREDICTED_STEMS[1:]),
    ]
    assert [r["image_id"] for r in records] == [2, 3, 4]
    clean_json = (clean / "predictions.json").read_text()
    assert json.loads(clean_json) == [p for r in records for p in r["predictions"]]

    # The state a kill leaves while the last image's PNG is being written, had the second
    # image's line been cut in half by an earlier kill: image 1 done, image 2's pictures whole
    # but its line partial (and its PNG cut, as a non-atomic writer would leave it), image 3
    # a half-written temporary PNG and no pictures; no predictions.json yet.
    first, second, third = PREDICTED_STEMS
    killed = tmp_path / "killed"
    shutil.copytree(clean, killed)
    (killed / "predictions.json").unlink()
    killed_shard = killed / "predictions.rank0.jsonl"
    killed_shard.write_bytes(header + skip + lines[0] + lines[1][: len(lines[1]) // 2])
    png = (clean / f"{second}_entities.png").read_bytes()
    (killed / f"{second}_entities.png").write_bytes(png[: len(png) // 2])
    (killed / f".{third}_entities.png.partial").write_bytes(png[: len(png) // 3])
    for name in (f"{third}_entities.png", f"{third}_overlay.jpg"):
        (killed / name).unlink()

    result = predict(checkpoint, tmp_path, images, killed, "inference.mode=batch_oc")
    assert result.returncode == 1  # broken.jpg again
    assert "1 of 4 images already done, skipped" in result.stdout + result.stderr
    assert (killed / "predictions.json").read_text() == clean_json  # every image once
    for stem in PREDICTED_STEMS:
        assert np.array_equal(
            np.asarray(Image.open(killed / f"{stem}_entities.png")),
            np.asarray(Image.open(clean / f"{stem}_entities.png")),
        )
        assert (killed / f"{stem}_overlay.jpg").is_file()
    _, _, *resumed = killed_shard.read_bytes().splitlines(keepends=True)
    untimed = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in resumed]
    assert [line for line in untimed if "skipped" not in line] == records  # the cut line replaced
    assert not list(killed.glob(".*"))

    other = {**json.loads(header)["settings"], "inference.mode": "image_o"}
    with pytest.raises(InputError) as info:  # what a rerun with inference.mode=image_o does
        read_shards(killed, other)
    assert str(info.value) == (
        f"output={killed} holds predictions made with other settings "
        "(inference.mode: batch_oc -> image_o): use another output= or delete its "
        "predictions.rank*.jsonl to start again"
    )


def test_predict_with_nothing_to_do_says_so(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = predict(checkpoint, tmp_path, empty, out)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"input={empty}: no image (") and last.endswith(": nothing to do")
    assert not out.exists()
    with pytest.raises(InputError) as info:
        find_inputs(f"{empty}/*.jpg")
    assert str(info.value) == (
        f"input={empty}/*.jpg: no such file or folder, no file matches it: nothing to do"
    )
    (empty / "a.jpg").write_bytes(b"")
    (empty / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"a\.jpg and .*a\.png would both write the outputs of a"):
        check_unique_outputs(find_inputs(str(empty)))


@pytest.mark.slow
def test_table7_sweep_from_one_checkpoint(checkpoint, tmp_path):
    result = run_python(
        "-m",
        "entityseg.evaluate",
        "-m",
        "experiment=demo",
        f"ckpt_path={checkpoint}",
        "hparams_search=table7",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.sweep.dir={tmp_path}/sweep",
        *SMALL_DATA,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = collected_table(tmp_path / "sweep")
    assert lines[0].startswith("| mode | AP^e (test) | AP^e_50 (test) | AP^e_75 (test) |")
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| [image_o]",
        "| [batch_o]",
        "| [batch_c]",
        "| [batch_oc]",
    ]
    assert lines[-1].endswith("| 41.0 |")
    for line, run in zip(
        lines[2:], sorted((tmp_path / "sweep").glob("*/table7.json")), strict=True
    ):
        (row,) = json.loads(run.read_text())  # each run evaluated one mode
        assert line.split(" | ")[1:4] == [f"{row[k]:.1f}" for k in ("AP", "AP50", "AP75")]


def test_predict_help_lists_its_own_keys_with_their_defaults():
    from omegaconf import OmegaConf

    result = run_python("-m", "entityseg.predict", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "gradient_clip_val" not in text and "max_steps" not in text  # not Swin-L's training
    assert "come from the\ncheckpoint" in text
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("predict", overrides=["ckpt_path=x", "input=y"])
    listed = text.split("== predict's keys (default) ==\n")[1].split("\n\n")[0].splitlines()
    checked = 0
    for line in listed:
        key, _, rest = line.partition("=")
        if key in ("ckpt_path", "input", "output", "trainer"):  # required, or not a value
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        shown = "null" if value is None else str(value).lower()
        assert rest.split()[0] == shown, (key, rest, value)  # the help keeps up with conf/
        checked += 1
    assert checked == 11
