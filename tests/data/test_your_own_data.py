"""A user's own COCO instance data set, end to end, as docs/data.md tells it: ``data=coco``
with the four paths, checked with the preview, fine-tuned a few steps from a checkpoint,
evaluated and predicted on; and a typo in a path writes nothing into the user's folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import cli_config, write_tiny_checkpoint
from entityseg import evaluate as evaluate_cli
from entityseg import predict as predict_cli
from entityseg.config import ConfigError
from entityseg.data import preview
from entityseg.data.datamodule import EntityDataModule
from entityseg.training import train

#: The shared photos' sizes (height, width).
PHOTOS = {"000000142238.jpg": (427, 640), "000000439180.jpg": (360, 640)}


def instance_json(path, photos: dict) -> None:
    """A COCO *instance* json as a user's tool writes one: polygons in two categories, and
    one crowd region as an uncompressed RLE."""
    images, annotations = [], []
    for image_id, (name, (height, width)) in enumerate(photos.items(), start=1):
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for k, (x, y, w, h) in enumerate(
            [(20, 30, 200, 150), (300, 60, 180, 200), (60, 250, 250, 90)]
        ):
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1 + k % 2,  # "person" and "car": collapsed into entities
                    "segmentation": [[float(v) for v in polygon]],
                    "area": float(w * h),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )
    crowd = np.zeros(photos[images[0]["file_name"]], np.uint8)
    crowd[300:400, 400:600] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": list(crowd.shape), "counts": _uncompressed(crowd)},
            "area": float(mask_utils.area(rle)),
            "bbox": mask_utils.toBbox(rle).tolist(),
            "iscrowd": 1,
        }
    )
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0, *counts]


@pytest.fixture(scope="module")
def dataset(shared_data, tmp_path_factory):
    """``mydata/``: the two shared COCO photos and ``instances.json``."""
    root = tmp_path_factory.mktemp("own")
    mydata = root / "mydata"
    (mydata / "images").mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(shared_data / "coco_panoptic_sample/images" / name, mydata / "images" / name)
    instance_json(mydata / "instances.json", PHOTOS)
    return root, mydata


def own_data(mydata, json_name: str = "instances.json") -> list[str]:
    """The documented keys: the four paths (training and validation on one set here)."""
    return [
        "data=coco",
        f"data.train_json={mydata / json_name}",
        f"data.train_images={mydata / 'images'}",
        f"data.val_json={mydata / 'instances.json'}",
        f"data.val_images={mydata / 'images'}",
        "data.num_workers=0",
    ]


def test_your_own_coco_instances_preview_fine_tune_evaluate_predict(dataset):
    root, mydata = dataset
    before = sorted(p.relative_to(mydata) for p in mydata.rglob("*"))
    # 1. check the data first
    (root / "preview").mkdir()
    preview.main(cli_config("train", root / "preview", "experiment=demo", *own_data(mydata)))
    assert (root / "preview" / "views.png").is_file()
    # 2. a few fine-tuning steps from a checkpoint
    start = write_tiny_checkpoint(root / "start.ckpt")
    run = root / "run"
    metrics, best = train(
        cli_config(
            "train",
            run,
            "experiment=demo",
            *own_data(mydata),
            f"model.init_from={start}",
            "trainer.max_steps=2",
            "trainer.check_val_every_n_epoch=1",
            "data.batch_size=2",
            "model.criterion.num_points=256",
        )
    )
    assert best and {"val/ap_batch_oc", "val/ap_image_o"} <= set(metrics)
    # 3. evaluate the fine-tuned model on the validation set
    evaluated = root / "evaluated"
    evaluate_cli.main(cli_config("eval", evaluated, f"ckpt_path={best}", *own_data(mydata)))
    rows = json.loads((evaluated / "table7.json").read_text())
    assert [r["mode"] for r in rows] == ["image_o", "batch_o", "batch_c", "batch_oc"]
    # 4. predict on the photos, ids from the json
    out = root / "predicted"
    predict_cli.main(
        cli_config(
            "predict",
            out,
            f"ckpt_path={best}",
            f"input={mydata / 'images'}",
            f"output={out}",
            f"gt={mydata / 'instances.json'}",
            "data.num_workers=0",
        )
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= {1, 2}
    # nothing was written into the user's folder
    assert sorted(p.relative_to(mydata) for p in mydata.rglob("*")) == before


def test_a_typo_in_a_path_is_one_line_and_writes_nothing(dataset, tmp_path):
    _, mydata = dataset
    before = sorted(p.relative_to(mydata) for p in mydata.rglob("*"))
    typo = mydata / "instance.json"  # the file is instances.json
    with pytest.raises(ConfigError) as own:  # data=coco: every path is checked at once
        train(
            cli_config("train", tmp_path / "run", "experiment=demo", *own_data(mydata, typo.name))
        )
    assert str(own.value) == f"data.train_json={str(typo)!r}: annotation file not found"
    # the same typo under the synthetic data config (experiment=demo alone): no scene is
    # rendered into mydata/, neither for a name of its own nor for the synthetic set's name
    synthetic = dict(num_train=2, num_val=1, seed=0, height=64, width=80)
    for json_path in (typo, mydata / "annotations.json"):
        datamodule = EntityDataModule(
            train_json=str(json_path),
            train_images=str(mydata / "images"),
            val_json=str(tmp_path / "val/annotations.json"),
            val_images=str(tmp_path / "val/images"),
            synthetic=synthetic,
        )
        with pytest.raises(ConfigError) as stop:
            datamodule.prepare_data()
        assert str(stop.value).startswith(
            f"data.train_json={str(json_path)!r}: annotation file not found (a synthetic set is "
            "generated only as annotations.json into a new or empty folder"
        )
    assert sorted(p.relative_to(mydata) for p in mydata.rglob("*")) == before
    # the synthetic config's own paths, in new folders: generated as always
    datamodule = EntityDataModule(
        train_json=str(tmp_path / "syn/train/annotations.json"),
        train_images=str(tmp_path / "syn/train/images"),
        val_json=str(tmp_path / "syn/val/annotations.json"),
        val_images=str(tmp_path / "syn/val/images"),
        synthetic=synthetic,
    )
    datamodule.prepare_data()
    assert (tmp_path / "syn/train/annotations.json").is_file()
