"""evaluate and predict end to end on a tiny random-weights model and synthetic images."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from pycocotools.coco import COCO

from conftest import REPO, collected_table, run_python

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
    assert "| Batch-OC |" in (out / "table7.md").read_text()
    gt = COCO(str(tmp_path / "data/synthetic/val/annotations.json"))
    for row in rows:
        predictions = json.loads((out / row["predictions"]).read_text())
        assert predictions and all(p["category_id"] == 1 for p in predictions)
        gt.loadRes(predictions)  # opens in pycocotools as it is
        assert row["forward_ms"] > 0 and 0 <= row["AP"] <= 100


def test_evaluate_refuses_unknown_mode_and_missing_checkpoint(checkpoint, tmp_path):
    result = run(
        "entityseg.evaluate", tmp_path, f"ckpt_path={checkpoint}", "inference.modes=[batch_x]"
    )
    assert result.returncode != 0
    assert "inference mode 'batch_x' is unknown" in result.stderr.strip().splitlines()[-1]
    result = run("entityseg.evaluate", tmp_path, f"ckpt_path={tmp_path}/nope.ckpt")
    assert result.returncode != 0 and "nope.ckpt: checkpoint not found" in result.stderr


def test_predict_on_a_folder_with_a_bad_file(checkpoint, tmp_path):
    from entityseg.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "photos", num_images=2, seed=1, height=96, width=128)
    images = tmp_path / "photos" / "images"
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(images / "gray.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "predicted"
    result = run(
        "entityseg.predict",
        tmp_path,
        f"ckpt_path={checkpoint}",
        f"input={images}",
        f"output={out}",
        "inference.mode=batch_oc",
    )
    assert result.returncode == 1
    assert f"{images / 'broken.jpg'}: not an image file" in result.stdout + result.stderr
    for stem in ("synthetic_000000", "synthetic_000001", "gray"):
        id_map = np.asarray(Image.open(out / f"{stem}.png"))
        assert id_map.dtype == np.uint16 and id_map.max() > 0
        assert (out / f"{stem}_overlay.jpg").is_file()
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in predictions} == {
        "synthetic_000000.jpg",
        "synthetic_000001.jpg",
        "gray.png",
    }

    with_gt = tmp_path / "with_gt"
    result = run(
        "entityseg.predict",
        tmp_path,
        f"ckpt_path={checkpoint}",
        f"input={images}/synthetic_*.jpg",
        f"output={with_gt}",
        f"gt={tmp_path / 'photos/annotations.json'}",
        "inference.mode=image_o",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((with_gt / "predictions.json").read_text())
    COCO(str(tmp_path / "photos/annotations.json")).loadRes(predictions)


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
    assert lines[0].startswith("| mode | AP^e |")
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| [image_o]",
        "| [batch_o]",
        "| [batch_c]",
        "| [batch_oc]",
    ]
    assert lines[-1].endswith("| 41.0 |")
