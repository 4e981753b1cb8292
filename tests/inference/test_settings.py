"""InferenceSettings: built from conf/inference or keywords, checked once, one line per error."""

import dataclasses
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from entityseg.config import CONFIG_DIR, ConfigError
from entityseg.inference.settings import INFERENCE_MODES, InferenceSettings


def test_defaults_are_conf_inference():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["ckpt_path=x", "input=y"])
    assert InferenceSettings.from_config(cfg.inference) == InferenceSettings()
    assert set(cfg.inference) == set(InferenceSettings.names())


def test_frozen_and_replace_validates():
    settings = InferenceSettings(mode="image_o", modes=["image_o", "batch_oc"])
    assert settings.modes == ("image_o", "batch_oc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mode = "batch_oc"
    assert settings.replace(max_entities=5).max_entities == 5
    with pytest.raises(ConfigError, match="inference.max_entities=-1: must be an integer >= 0"):
        settings.replace(max_entities=-1)
    assert InferenceSettings.from_config(settings.to_dict()) == settings


def test_view_chunk_auto_is_one_view_on_cpu_and_all_on_gpu():
    assert InferenceSettings().views_at_once("cpu") == 1
    assert InferenceSettings().views_at_once("cuda:0") is None
    assert InferenceSettings(view_chunk=3).views_at_once("cuda") == 3
    assert InferenceSettings(view_chunk=None).views_at_once("cpu") is None


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("view_chunk", 0, "must be auto, null or an integer >= 1"),
        ("view_chunk", "all", "must be auto, null or an integer >= 1"),
        ("view_chunk", 1.5, "must be auto, null or an integer >= 1"),
        ("view_chunk", True, "must be auto, null or an integer >= 1"),
        ("mode", "batch", "unknown inference mode"),
        ("modes", ["image_o", "x"], "unknown inference mode"),
        ("modes", [], "must list at least one mode"),
        ("modes", "image_o", "must be a list of modes"),
        ("max_entities", 1.5, "must be an integer >= 0"),
        ("overlapping", "yes", "must be true or false"),
        ("cuda_graphs", "yes", "must be true or false"),
        ("query_chunk", 0, "must be an integer >= 1"),
        ("compat", "detectron2", "unknown; expected one of"),
        ("score_threshold", 1.5, "must be in [0, 1]"),
        ("score_threshold", "0.5", "must be in [0, 1]"),
        ("precision", "fp16", "is unknown; expected one of ['fp32', 'bf16']"),
        ("device", "gpu", "not a device"),
        ("colour", "red", "unknown setting; expected one of"),
    ],
)
def test_a_bad_setting_is_one_clear_line_naming_its_key(key, value, problem):
    with pytest.raises(ConfigError) as err:
        InferenceSettings.from_config({key: value})
    assert err.value.key == f"inference.{key}"
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_release_compat_cannot_overlap():
    with pytest.raises(ConfigError, match="inference.compat='release': the release has non-ov"):
        InferenceSettings(compat="release", overlapping=True)


def test_precision_and_compat_as_the_runner_reads_them():
    assert InferenceSettings().autocast_dtype is None
    assert InferenceSettings(precision="bf16").autocast_dtype is torch.bfloat16
    assert InferenceSettings().fusion_compat == "entityseg"
    assert InferenceSettings(compat="release").fusion_compat == "release"
    assert InferenceSettings(device=torch.device("cpu")).device == "cpu"
    assert set(InferenceSettings().modes) == set(INFERENCE_MODES)


@pytest.mark.parametrize(
    ("compare", "problem"),
    [
        (["image_o"], "must be two different modes, or []"),
        (["batch_oc", "batch_oc"], "must be two different modes, or []"),
        ("image_o", "must be a list of two modes, or []"),
        (["image_o", "batch_x"], "unknown inference mode"),
    ],
)
def test_compare_takes_two_different_modes(compare, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        InferenceSettings(compare=compare)
    assert InferenceSettings(compare=["image_o", "batch_oc"]).compare == ("image_o", "batch_oc")
