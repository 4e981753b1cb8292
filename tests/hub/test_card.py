"""The model card: the Hub's YAML header and model-index, the body, refreshing its metrics."""

from __future__ import annotations

import math

import pytest
import yaml
from huggingface_hub import ModelCard

from entityseg.config import ConfigError, UserError
from entityseg.hub.card import (
    AUTHORS,
    CardInfo,
    card_metrics,
    metrics_by_mode,
    model_card,
    refresh_card_metrics,
    write_model_card,
)

METRICS = {
    "image_o": {"ap": 40.6, "ap50": 58.13, "ap75": 41.07},
    "batch_o": {"ap": 41.2, "ap50": 59.0, "ap75": 42.25},
    "batch_c": {"ap": 39.9, "ap50": 57.5, "ap75": 40.125},
    "batch_oc": {"ap": 43.0, "ap50": 61.3, "ap75": 44.4},
}
SOURCE = {
    "repo_id": "qqlu1992/Adobe_EntitySeg",
    "repo_type": "dataset",
    "path": "CropFormer_model/Entity_Segmentation/CropFormer_swin_tiny_3x/CropFormer_x_03823a.pth",
    "revision": "0123456789abcdef0123456789abcdef01234567",
    "etag": "5d41402abc4b2a76b9719d911017c592",
}
RECIPE = {
    "experiment": "cropformer_swint",
    "steps": 34375,
    "global_batch": 16,
    "lr": 0.0001,
    "data": {"train_json": "annotations/train.json", "train_images": "images/"},
}


def release_info(**changes) -> CardInfo:
    values = dict(
        name="cropformer_swin_tiny_3x",
        license="cc-by-nc-4.0",
        architecture="CropFormer",
        backbone="swin_tiny_patch4_window7_224",
        num_queries=100,
        metrics=METRICS,
        dataset="EntitySeg",
        datasets=["qqlu1992/Adobe_EntitySeg"],
        source=SOURCE,
    )
    return CardInfo(**{**values, **changes})


def own_info(**changes) -> CardInfo:
    values = dict(
        name="someone/cropformer-swint-finetuned",
        license="apache-2.0",
        architecture="CropFormer",
        backbone="swin_tiny_patch4_window7_224",
        num_queries=100,
        dataset="synthetic",
        base_model="someone/cropformer-swint",
        recipe=RECIPE,
    )
    return CardInfo(**{**values, **changes})


def header(text: str) -> dict:
    """The YAML between the first two ``---`` lines, as a plain YAML reader sees it."""
    first, block, _ = text.split("---\n", 2)
    assert first == ""
    return yaml.safe_load(block)


def body(text: str) -> str:
    return text.split("---\n", 2)[2]


def test_header_is_the_hubs_yaml_with_every_metric_exactly(tmp_path):
    path = write_model_card(tmp_path, release_info())
    text = path.read_text()
    meta = header(text)
    assert meta["library_name"] == "entityseg"
    assert meta["license"] == "cc-by-nc-4.0"
    assert meta["pipeline_tag"] == "image-segmentation"
    assert meta["datasets"] == ["qqlu1992/Adobe_EntitySeg"]
    assert {"image-segmentation", "entity-segmentation", "cropformer", "pytorch"} <= set(
        meta["tags"]
    )
    assert "base_model" not in meta
    (index,) = meta["model-index"]
    assert index["name"] == "cropformer_swin_tiny_3x"
    (result,) = index["results"]  # one task and dataset: all modes' metrics together
    assert result["task"]["type"] == "image-segmentation"
    assert result["dataset"]["name"] == "EntitySeg"
    names = {"ap": "AP^e", "ap50": "AP^e_50", "ap75": "AP^e_75"}
    paper = {"image_o": "Image-O", "batch_o": "Batch-O", "batch_c": "Batch-C"}
    paper["batch_oc"] = "Batch-OC"
    seen = {}
    for metric in result["metrics"]:
        key = {"ap_e": "ap", "ap_e50": "ap50", "ap_e75": "ap75"}[metric["type"]]
        assert metric["name"] == f"{names[key]} ({paper[metric['config']]})"
        seen.setdefault(metric["config"], {})[key] = metric["value"]
    assert seen == METRICS  # exactly: the floats round-trip through YAML
    card = ModelCard.load(path)  # huggingface_hub reads it back
    assert card.data.library_name == "entityseg"
    assert len(card.data.eval_results) == 12
    assert card.data.eval_results[0].task_type == "image-segmentation"
    assert card_metrics(path) == METRICS
    assert card_metrics(tmp_path) == METRICS  # the folder holding it


def test_release_card_credits_the_authors_and_the_non_commercial_licence():
    text = body(str(model_card(release_info())))
    assert "CC BY-NC 4.0" in text and "non-commercial" in text
    for author in AUTHORS:
        assert author in text
    assert "qqlu/Entity" in text and "Entityv2" in text
    assert SOURCE["path"] in text and SOURCE["etag"] in text
    assert "https://huggingface.co/datasets/qqlu1992/Adobe_EntitySeg/blob/" in text
    assert "| Batch-OC | 43.0 | 61.3 | 44.4 |" in text
    assert "@inproceedings{qi2023high" in text
    assert "about 2.4x the time of Image-O" in text
    assert 'EntitySegmenter.from_pretrained("cropformer_swin_tiny_3x")' in text
    assert "## Training" not in text


def test_own_card_without_metrics_has_no_model_index_and_shows_its_recipe(tmp_path):
    path = write_model_card(tmp_path, own_info())
    text = path.read_text()
    meta = header(text)
    assert "model-index" not in meta
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "someone/cropformer-swint"
    assert "datasets" not in meta
    assert "mask2former" not in meta["tags"] and "cropformer" in meta["tags"]
    text = body(text)
    assert "## Results" not in text and "| Mode |" not in text
    assert "CC BY-NC" not in text
    assert "| data.train_json | `annotations/train.json` |" in text
    assert "| steps | `34375` |" in text
    assert 'EntitySegmenter.from_pretrained("someone/cropformer-swint-finetuned")' in text
    assert "python -m entityseg.predict ckpt_path=" in text and "input=photos/" in text
    assert card_metrics(path) == {}


def test_mask2former_card_runs_image_o_only():
    info = release_info(
        name="mask2former_swin_tiny_3x",
        architecture="Mask2Former",
        metrics={"image_o": METRICS["image_o"]},
    )
    card = model_card(info)
    assert "mask2former" in card.data.tags
    assert "Image-O only" in card.text and "2.4x" not in card.text
    with pytest.raises(ConfigError, match="Mask2Former runs"):
        release_info(architecture="Mask2Former")  # Batch-* metrics need the batch decoder


def test_zoo_base_model_is_named_in_the_body_only():
    card = model_card(own_info(base_model="cropformer_swin_tiny_3x"))
    assert card.data.base_model is None  # the Hub's base_model takes repository ids only
    assert "`cropformer_swin_tiny_3x` (a release model, cc-by-nc-4.0)" in card.text


def test_refresh_changes_the_numbers_and_keeps_the_rest(tmp_path):
    path = write_model_card(tmp_path, own_info(metrics={"batch_oc": {"ap": 1.5}}))
    text = path.read_text().replace("library_name:", "language: en\nlibrary_name:", 1)
    path.write_text(text)  # a key added by hand
    new = {"image_o": {"ap": 2.25, "ap50": 7.5, "ap75": 0.0}, "batch_oc": {"ap": 3.125}}
    assert refresh_card_metrics(tmp_path, new) == path
    assert card_metrics(path) == new
    refreshed = path.read_text()
    meta = header(refreshed)
    assert meta["language"] == "en"
    assert meta["base_model"] == "someone/cropformer-swint"
    assert meta["license"] == "apache-2.0"
    assert meta["entityseg"]["recipe"] == RECIPE
    assert "| Image-O | 2.2 | 7.5 | 0.0 |" in refreshed
    assert "| Batch-OC | 3.1 | - | - |" in refreshed
    assert "| Batch-OC | 1.5" not in refreshed
    assert "| steps | `34375` |" in refreshed
    rebuilt = CardInfo.from_dict(meta["entityseg"], metrics=new)
    assert str(model_card(rebuilt)) == refreshed.replace("language: en\n", "")

    release = write_model_card(tmp_path / "release", release_info())
    refresh_card_metrics(release, {"batch_oc": {"ap": 50.0}})
    text = release.read_text()
    assert card_metrics(release) == {"batch_oc": {"ap": 50.0}}
    assert header(text)["license"] == "cc-by-nc-4.0"
    assert header(text)["entityseg"]["source"] == SOURCE
    assert "CC BY-NC 4.0" in body(text)


def test_refresh_of_a_card_not_ours_is_a_one_line_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nlicense: mit\n---\n\n# Someone's model\n")
    with pytest.raises(UserError, match="not an entityseg model card"):
        refresh_card_metrics(path, METRICS)
    with pytest.raises(UserError, match="no model card there"):
        card_metrics(tmp_path / "missing" / "README.md")


def test_metrics_by_mode_groups_the_logged_metrics():
    flat = {
        "train/loss": 12.5,
        "val/ap_batch_oc": 41.5,
        "val/ap50_batch_oc": 60.0,
        "val/ap75_batch_oc": float("nan"),  # no ground truth: logged as NaN
        "val/ap_image_o": 39.0,
        "val/ap50_image_o": None,  # metrics.json writes NaN as null
        "val/forward_ms_image_o": 80.0,
        "test/ap_batch_oc": 42.0,
        "test/ap_batch_c": float("nan"),
        "test/ap50_batch_c": float("nan"),
    }
    assert metrics_by_mode(flat, split="val") == {
        "image_o": {"ap": 39.0},
        "batch_oc": {"ap": 41.5, "ap50": 60.0},
    }
    assert metrics_by_mode(flat) == {"batch_oc": {"ap": 42.0}}  # test, when logged
    assert metrics_by_mode({k: v for k, v in flat.items() if k.startswith("val")}) == (
        metrics_by_mode(flat, split="val")
    )
    assert metrics_by_mode({"train/loss": 1.0}) == {}
    with pytest.raises(UserError, match="several splits"):
        metrics_by_mode({"a/ap_image_o": 1.0, "b/ap_image_o": 2.0})
    info = own_info(metrics=metrics_by_mode(flat, split="val"))
    assert not any(math.isnan(v) for values in info.metrics.values() for v in values.values())


def test_write_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "model"
    write_model_card(folder, own_info())
    write_model_card(folder, own_info(metrics=METRICS))  # over an existing card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_bad_info_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="dataset"):
        own_info(dataset=None, metrics=METRICS)
    with pytest.raises(ConfigError, match=r"metrics\.batch_oc\.ap="):
        own_info(metrics={"batch_oc": {"ap": float("nan")}})
    with pytest.raises(ConfigError, match="metrics"):
        own_info(metrics={"batch_x": {"ap": 1.0}})
    with pytest.raises(ConfigError, match="cc-by-nc-4.0"):
        release_info(license="apache-2.0")
    with pytest.raises(ConfigError, match="datasets"):
        own_info(datasets="EntitySeg")
    with pytest.raises(ConfigError, match="recipe.lr"):
        own_info(recipe={"lr": object()})
