"""Released models by name, model folders and the Hub, through huggingface_hub's own client
against a loopback Hub (tests/hub_server.py) that serves the release's repository layout.

The served repository (``qqlu1992/Adobe_EntitySeg``, a gated dataset) holds:
* the reduced release checkpoints of ``../shared/data/official_reference`` with their yaml,
  under the folders of three released models (the yaml beside them is what they convert with);
* a full-size CropFormer Swin-T checkpoint of random weights made from the release's key list
  (49 M values) under its real folder and file name, without a yaml: converted by the built-in
  recipe (``experiment=cropformer_swint``);
* a text file posing as a checkpoint, and a starting-weights file in ``COCO_Pretrained_Weights``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import SHARED_DATA, cli_config, run_python, write_tiny_checkpoint
from entityseg import CheckpointError, EntitySegmenter, zoo
from entityseg.data.coco_entity import read_rgb_image
from entityseg.hub import HubError, resolve_model
from entityseg.hub import release as hub_release
from entityseg.hub.card import card_metrics, read_card_info
from entityseg.interop.release import convert_release
from entityseg.models.checkpoint import load_weights
from entityseg.models.cropformer import CropFormer
from entityseg.models.pretrained import CONFIG_FILE, MODEL_FILE, read_model_config
from hub_server import LoopbackHub

REFERENCE = SHARED_DATA / "official_reference"
FOLDER = zoo.FOLDER
TOKEN = "hf_good"
#: released name -> (the reduced reference model served in its folder, the file's name)
REDUCED = {
    "cropformer_swin_large_3x": ("cropformer_tiny", "CropFormer_swin_large_w7_3x_6843ef.pth"),
    "cropformer_hornet_3x": ("cropformer_hornet_tiny", "CropFormer_hornet_3x_03823a.pth"),
    "mask2former_swin_tiny_3x": ("mask2former_tiny", "Mask2Former_swin_tiny_3x_3cacfb.pth"),
}
FULL_NAME = "cropformer_swin_tiny_3x"
FULL_FILE = f"{FOLDER}/CropFormer_swin_tiny_3x/CropFormer_swin_tiny_3x_5cea5e.pth"
BROKEN_FILE = f"{FOLDER}/Mask2Former_swin_large_w7_3x/Mask2Former_swin_large_w7_3x_dd4543.pth"
INIT_WEIGHTS = "entityv2_50ep_with_coco_same_epoch_model_final.pth"
#: small test views for the full-size network (the recipe's are 800 / 1333)
SMALL = {"test_short_size": 160, "test_max_size": 256}


def full_size_release_file(path: Path, key_list: Path, drop: tuple[str, ...] = ()) -> Path:
    """A release checkpoint of random weights with every tensor of ``key_list`` (its names,
    shapes and dtypes; names starting with ``drop`` left out), as the release writes it."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape, dtype in json.loads(key_list.read_text())["keys"]:
        if name.startswith(drop):
            continue
        if dtype.startswith("float"):
            state[name] = 0.02 * torch.randn(shape, generator=generator)
        else:
            state[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
    torch.save({"model": state, "iteration": 0}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data) -> dict[str, Path]:
    """The served files (path in the repository -> local file)."""
    made = tmp_path_factory.mktemp("release_files")
    key_list = REFERENCE / "key_lists/keys_cropformer_swin_tiny.json"
    served = {FULL_FILE: full_size_release_file(made / "full.pth", key_list)}
    for name, (reference, file_name) in REDUCED.items():
        folder = f"{FOLDER}/{zoo.released_model(name).folder}"
        served[f"{folder}/{file_name}"] = REFERENCE / reference / "model_final.pth"
        served[f"{folder}/config.yaml"] = REFERENCE / reference / "config.yaml"
    (made / "broken.pth").write_text("this is not a checkpoint\n")
    served[BROKEN_FILE] = made / "broken.pth"
    return served


@pytest.fixture()
def hub(files, monkeypatch, tmp_path) -> Iterator[LoopbackHub]:
    """The release's gated repository on a loopback Hub; huggingface_hub pointed at it with
    an empty cache under ``tmp_path/hf``."""
    with LoopbackHub() as hub:
        hub.add_repo(zoo.REPO_ID, repo_type=zoo.REPO_TYPE, files=files, gated=True)
        hub.tokens = {TOKEN}
        hub.patch(monkeypatch, tmp_path / "hf")
        yield hub
        assert hub.errors == []


@pytest.fixture(scope="module")
def photo(shared_data) -> np.ndarray:
    return read_rgb_image(next((shared_data / "coco_panoptic_sample/images").glob("*.jpg")))


def same_entities(a, b) -> None:
    assert len(a) > 0
    assert a.rles == b.rles
    np.testing.assert_array_equal(a.scores, b.scores)


def file_gets(hub: LoopbackHub, path: str) -> int:
    return sum(
        r.method == "GET" and "/resolve/" in r.path and r.path.endswith(path) for r in hub.requests
    )


# --------------------------------------------------------------------------- by name
@pytest.mark.parametrize("name", sorted(REDUCED))
def test_released_model_by_name_equals_convert_release(hub, name, photo, tmp_path):
    """A folder holding the release's yaml converts with it: entity for entity what
    ``convert_release`` with that yaml and ``from_checkpoint`` give."""
    segmenter = EntitySegmenter.from_pretrained(name, token=TOKEN, device="cpu")
    reference, _ = REDUCED[name]
    ckpt = tmp_path / "converted.ckpt"
    folder = REFERENCE / reference
    convert_release(folder / "model_final.pth", folder / "config.yaml", ckpt)
    expected = EntitySegmenter.from_checkpoint(ckpt, device="cpu")
    assert segmenter.settings.compat == expected.settings.compat == "release"
    assert segmenter.views == expected.views
    same_entities(segmenter(photo), expected(photo))


def test_full_size_file_by_the_built_in_recipe(hub, files, photo, tmp_path, monkeypatch):
    """The full-size Swin-T file, found by listing its folder (hash suffix unknown), converted
    with experiment=cropformer_swint: the entities of the release's yaml path; cached as
    safetensors with a card that keeps the licence and credits the authors. The second call,
    online and then offline, downloads and converts nothing."""
    started = time.perf_counter()
    cold = EntitySegmenter.from_pretrained(FULL_NAME, token=TOKEN, device="cpu", **SMALL)
    cold_s = time.perf_counter() - started
    ckpt = tmp_path / "swin_tiny.ckpt"
    convert_release(
        files[FULL_FILE], REFERENCE / "key_lists/config_cropformer_swin_tiny.yaml", ckpt
    )
    started = time.perf_counter()
    expected = EntitySegmenter.from_checkpoint(ckpt, device="cpu", **SMALL)
    ckpt_s = time.perf_counter() - started
    same_entities(cold(photo), expected(photo))

    etag = hub.etag(zoo.REPO_ID, FULL_FILE, repo_type=zoo.REPO_TYPE)
    folder = tmp_path / "hf/entityseg/converted" / etag
    assert cold.checkpoint == folder / MODEL_FILE
    config = read_model_config(folder)
    assert config["source"]["path"] == FULL_FILE and config["source"]["etag"] == etag
    assert config["source"]["recipe"] == "experiment=cropformer_swint"
    assert config["inference"]["compat"] == "release"
    card = read_card_info(folder)
    assert card.license == "cc-by-nc-4.0" and card.source["etag"] == etag
    text = (folder / "README.md").read_text()
    assert "Lu Qi" in text and "Ming-Hsuan Yang" in text and "CC BY-NC 4.0" in text
    header = (folder / MODEL_FILE).read_bytes()[:9]
    assert header[8:9] == b"{"  # safetensors: a length and a json header, nothing to unpickle

    gets = file_gets(hub, FULL_FILE)
    monkeypatch.setattr(hub_release, "convert_release_weights", _must_not_convert)
    started = time.perf_counter()
    warm = EntitySegmenter.from_pretrained(FULL_NAME, token=TOKEN, device="cpu", **SMALL)
    warm_s = time.perf_counter() - started
    assert file_gets(hub, FULL_FILE) == gets  # nothing downloaded again
    LoopbackHub.offline(monkeypatch)
    hub.requests.clear()
    offline = EntitySegmenter.from_pretrained(FULL_NAME, device="cpu", **SMALL)
    assert hub.requests == []
    for again in (warm, offline):  # the cached model: the same folder, the same weights
        assert again.checkpoint == cold.checkpoint and again.views == cold.views
        weights = again.net.state_dict()
        for name, tensor in cold.net.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
    sizes = {
        "release .pth": files[FULL_FILE].stat().st_size,
        ".ckpt": ckpt.stat().st_size,
        "model.safetensors": (folder / MODEL_FILE).stat().st_size,
    }
    print(
        f"\nfull-size Swin-T: from_pretrained cold {cold_s:.1f} s, warm {warm_s:.1f} s; "
        f"from_checkpoint {ckpt_s:.1f} s; bytes {sizes}"
    )


def _must_not_convert(*args, **kwargs):
    raise AssertionError("converted again")


# --------------------------------------------------------------------------- errors
def test_gated_repository_without_access_says_what_to_do(hub):
    for token, reason in (
        (None, "no Hugging Face token was found"),
        ("hf_other", "the token given has no access to it"),
    ):
        with pytest.raises(HubError) as info:
            EntitySegmenter.from_pretrained("cropformer_hornet_3x", token=token)
        message = str(info.value)
        assert "\n" not in message and zoo.REPO_ID in message and reason in message
        assert f"/datasets/{zoo.REPO_ID}" in message and "hf auth login" in message


def test_unknown_name_lists_the_released_models():
    with pytest.raises(HubError) as info:
        resolve_model("cropformer_swin_tiny")
    assert "not a released model" in str(info.value)
    assert all(name in str(info.value) for name in zoo.NAMES)
    with pytest.raises(FileNotFoundError):  # a missing checkpoint file stays a missing file
        EntitySegmenter.from_pretrained("runs/missing.ckpt")


def test_offline_with_nothing_cached(hub, monkeypatch):
    LoopbackHub.offline(monkeypatch)
    with pytest.raises(HubError) as info:
        EntitySegmenter.from_pretrained("cropformer_hornet_3x", token=TOKEN)
    assert "not in the cache" in str(info.value) and "HF_HUB_OFFLINE=1" in str(info.value)
    assert hub.requests == []


def test_a_file_that_is_not_a_checkpoint(hub):
    with pytest.raises(HubError) as info:
        EntitySegmenter.from_pretrained("mask2former_swin_large_3x", token=TOKEN)
    message = str(info.value)
    assert message.startswith(f"{zoo.REPO_ID}/{BROKEN_FILE}: not a readable PyTorch checkpoint")
    assert "\n" not in message


def test_a_cut_download_is_resumed_or_named(hub, monkeypatch):
    """huggingface_hub resumes a dropped download within the call (Range from its last whole
    chunk); when its retries give up, one line says to run again."""
    from huggingface_hub import constants, file_download

    waits = []
    monkeypatch.setattr(file_download, "time", type("T", (), {"sleep": waits.append}))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    path = f"{FOLDER}/CropFormer_hornet_3x/CropFormer_hornet_3x_03823a.pth"
    hub.cut_next_download(after_bytes=0, times=6)
    with pytest.raises(HubError) as info:
        EntitySegmenter.from_pretrained("cropformer_hornet_3x", token=TOKEN)
    assert "cut off" in str(info.value) and "run the same again" in str(info.value)
    assert "\n" not in str(info.value)
    hub.requests.clear()
    hub.cut_next_download(after_bytes=(3 << 20) + 5)
    EntitySegmenter.from_pretrained("cropformer_hornet_3x", token=TOKEN, device="cpu")
    ranges = [
        r.headers.get("range") for r in hub.requests if r.method == "GET" and r.path.endswith(path)
    ]
    assert ranges == [None, f"bytes={3 << 20}-"]


def test_revision_pins_a_commit_and_a_new_file_is_converted_again(hub, files, photo):
    old = hub.commit(zoo.REPO_ID, repo_type=zoo.REPO_TYPE)
    name, (reference, file_name) = "mask2former_swin_tiny_3x", REDUCED["mask2former_swin_tiny_3x"]
    first = resolve_model(name, token=TOKEN)
    changed = torch.load(REFERENCE / reference / "model_final.pth", weights_only=True)
    key = next(k for k in changed["model"] if k.endswith("class_embed.bias"))
    changed["model"][key] = changed["model"][key] + 1.0
    data = Path(first).parent / "changed.pth"
    torch.save(changed, data)
    hub.add_file(
        zoo.REPO_ID, f"{FOLDER}/Mask2Former_swin_tiny_3x/{file_name}", data, repo_type=zoo.REPO_TYPE
    )
    latest = resolve_model(name, token=TOKEN)
    assert latest != first and latest.name != first.name  # another etag, converted again
    assert resolve_model(name, token=TOKEN, revision=old) == first
    scores = [
        EntitySegmenter.from_pretrained(path, device="cpu")(photo).scores
        for path in (first, latest)
    ]
    assert not np.array_equal(*scores)


# --------------------------------------------------------------------------- our own models
def test_save_pretrained_round_trip_equals_the_checkpoint(tmp_path, photo):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.ckpt")
    segmenter = EntitySegmenter.from_checkpoint(ckpt, device="cpu", mode="batch_oc")
    segmenter.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "README.md",
        CONFIG_FILE,
        MODEL_FILE,
    ]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model" / MODEL_FILE)
    for name, tensor in segmenter.net.state_dict().items():
        assert torch.equal(saved[name], tensor)
    config = read_model_config(tmp_path / "model")
    assert config["entityseg_version"] and config["views"] == segmenter.views.to_keys()
    assert config["inference"]["mode"] == "batch_oc"
    loaded = EntitySegmenter.from_pretrained(tmp_path / "model", device="cpu")
    assert loaded.settings.mode == "batch_oc" and loaded.views == segmenter.views
    same_entities(loaded(photo[::4, ::4].copy()), segmenter(photo[::4, ::4].copy()))
    with pytest.raises(CheckpointError, match="is the folder this model was loaded from"):
        loaded.save_pretrained(tmp_path / "model")  # never written over its own input
    header = yaml.safe_load((tmp_path / "model/README.md").read_text().split("---")[1])
    assert header["library_name"] == "entityseg" and "entity-segmentation" in header["tags"]


def test_push_to_hub_hands_the_folder_to_huggingface_hub(hub, tmp_path, monkeypatch, photo):
    """push_to_hub gives huggingface_hub's upload the model folder; served back as a model
    repository, from_pretrained("user/name") gives the same entities (offline too)."""
    from huggingface_hub import HfApi

    uploaded, created = {}, []

    def create_repo(self, repo_id, **kwargs):
        created.append((repo_id, kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return f"{hub.endpoint}/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ckpt = write_tiny_checkpoint(tmp_path / "t.ckpt")
    segmenter = EntitySegmenter.from_checkpoint(ckpt, device="cpu")
    url = segmenter.push_to_hub("someone/tiny-entities", private=True, token=TOKEN)
    assert url.endswith("/someone/tiny-entities/commit/1")
    assert created == [("someone/tiny-entities", {"private": True, "exist_ok": True})]
    assert sorted(uploaded) == ["README.md", CONFIG_FILE, MODEL_FILE]

    hub.add_repo("someone/tiny-entities", files=uploaded)
    image = photo[::4, ::4].copy()
    loaded = EntitySegmenter.from_pretrained("someone/tiny-entities", device="cpu")
    same_entities(loaded(image), segmenter(image))
    LoopbackHub.offline(monkeypatch)
    again = EntitySegmenter.from_pretrained("someone/tiny-entities", device="cpu")
    same_entities(again(image), segmenter(image))


# --------------------------------------------------------------------------- entry points
def test_predict_evaluate_and_export_take_a_name(hub, coco_sample, tmp_path, monkeypatch):
    """``ckpt_path=<name>`` in predict (online, then offline from the cache), export
    format=pretrained and evaluate update_card=true on the exported folder."""
    env = {**os.environ, **hub.env(tmp_path / "hf"), "HF_TOKEN": TOKEN}
    photo = next((coco_sample / "images").glob("*.jpg"))
    name = "cropformer_hornet_3x"
    runs = {}
    for mode, offline in (("online", "0"), ("offline", "1")):
        result = run_python(
            "-m",
            "entityseg.predict",
            f"ckpt_path={name}",
            f"input={photo}",
            f"output={tmp_path / mode}",
            f"hydra.run.dir={tmp_path}/h_{mode}",
            env={**env, "HF_HUB_OFFLINE": offline},
        )
        assert result.returncode == 0, result.stderr
        runs[mode] = json.loads((tmp_path / mode / "predictions.json").read_text())
    assert runs["online"] == runs["offline"] and len(runs["online"]) > 0
    expected = EntitySegmenter.from_pretrained(name, token=TOKEN, device="cpu")(str(photo))
    assert [r["segmentation"] for r in runs["online"]] == expected.rles

    # in this process (the in-process Hub client is the loopback one): export and evaluate
    from entityseg import evaluate, export
    from entityseg.data.coco_entity import panoptic_to_entity_json

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    exported = tmp_path / "exported"
    overrides = [f"ckpt_path={name}", "format=pretrained", f"output={exported}"]
    export.main(cli_config("export", tmp_path / "h_export", *overrides))
    assert read_card_info(exported).license == "cc-by-nc-4.0"
    same_entities(EntitySegmenter.from_pretrained(exported, device="cpu")(str(photo)), expected)

    gt = panoptic_to_entity_json(
        coco_sample / "panoptic.json", coco_sample / "panoptic", tmp_path / "entity.json"
    )
    (tmp_path / "h_eval").mkdir()  # the run folder Hydra would make
    data = [f"data.{split}_json={gt}" for split in ("train", "val")]
    data += [f"data.{split}_images={coco_sample}/images" for split in ("train", "val")]
    overrides = [f"ckpt_path={exported}", "update_card=true", "data=coco_entity", *data]
    overrides += ["data.num_workers=0", "inference.modes=[image_o,batch_oc]"]
    evaluate.main(cli_config("eval", tmp_path / "h_eval", *overrides))
    table = {r["mode"]: r for r in json.loads((tmp_path / "h_eval/table7.json").read_text())}
    metrics = card_metrics(exported)
    assert metrics["batch_oc"]["ap"] == pytest.approx(table["batch_oc"]["AP"])
    assert metrics["image_o"]["ap50"] == pytest.approx(table["image_o"]["AP50"])


def test_fine_tuning_from_a_name_and_the_release_starting_weights(hub, tmp_path, monkeypatch):
    """``model.init_from=<name>`` and a release experiment's ``init_from_release`` (fetched
    from COCO_Pretrained_Weights, converted for the experiment's network, the association
    left fresh) resolve to cached model folders."""
    from hydra import compose, initialize_config_dir

    from entityseg.config import CONFIG_DIR
    from entityseg.training import check_release_init, resolve_init_from

    key_list = REFERENCE / "key_lists/keys_cropformer_swin_tiny.json"
    mask2former = ("sem_seg_head.predictor.make_3d",)  # no association module
    init = full_size_release_file(tmp_path / "init.pth", key_list, drop=mask2former)
    hub.add_file(
        zoo.REPO_ID,
        f"{zoo.PRETRAINED_FOLDER}/{Path(INIT_WEIGHTS).stem}_0a1b2c.pth",
        init,
        repo_type=zoo.REPO_TYPE,
    )
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        named = compose(
            "train", overrides=["experiment=demo", "model.init_from=mask2former_swin_tiny_3x"]
        )
        release = compose("train", overrides=["experiment=cropformer_swint"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # as `hf auth login` or a CI secret gives it
    assert resolve_init_from(named) == "mask2former_swin_tiny_3x"
    assert Path(named.model.init_from).parent.name == "converted"
    assert named.base_model == "mask2former_swin_tiny_3x"
    check_release_init(release)
    folder = Path(release.model.init_from)
    assert read_model_config(folder)["source"]["path"].endswith("_0a1b2c.pth")
    network = OmegaConf.to_container(release.model.net, resolve=True)
    network.pop("_target_")
    fresh = load_weights(CropFormer(**network), folder, allow_fresh_parts=True)
    assert fresh == ["association"]
    assert release.base_model.endswith(INIT_WEIGHTS)


# --------------------------------------------------------------------------- the zoo
def test_the_zoo_names_experiments_that_build_its_networks():
    from entityseg.hub.release import experiment_recipe

    for model in zoo.MODELS:
        network, views = experiment_recipe(model.experiment)
        assert network["decoder"]["num_queries"] == model.queries, model.name
        assert network["association"]["enabled"] == (model.architecture == "CropFormer")
        assert (views["test_short_size"], views["test_max_size"]) == (800, 1333)
        assert model.license == "cc-by-nc-4.0" and model.ap_low < model.ap_high
    assert [line.count("|") for line in zoo.markdown_table().splitlines()] == [9] * 8


def test_another_librarys_model_repository_is_refused_before_its_weights(hub):
    config = json.dumps({"model_type": "mask2former"}).encode()
    files = {CONFIG_FILE: config, MODEL_FILE: b"\0" * 4096}
    hub.add_repo("someone/transformers-model", files=files)
    with pytest.raises(HubError) as info:
        EntitySegmenter.from_pretrained("someone/transformers-model")
    assert "holds no entityseg model" in str(info.value) and "\n" not in str(info.value)
    assert not any(r.path.endswith(MODEL_FILE) for r in hub.requests)
    with pytest.raises(HubError) as info:
        EntitySegmenter.from_pretrained("someone/missing-model")
    assert "no such repository" in str(info.value)
