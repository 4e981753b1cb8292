"""Released checkpoints: converted, they compute what the release's own code computed.

``../shared/data/official_reference`` holds, for three reduced models with random weights, the
release's checkpoint and config, its prepared input views of two COCO photos, its raw outputs and
its final entities; ``key_lists`` the names and shapes of the full-size released models.
"""

import json
import pickle
import re

import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import pycocotools_ap, run_python
from entityseg.inference.fusion import fuse_entities
from entityseg.inference.settings import InferenceSettings
from entityseg.interop.release import (
    ReleaseConversionError,
    convert_release,
    convert_state_dict,
    load_release_config,
    net_config_from_release,
    network_shapes,
    num_fpn_levels,
    parse_gnconv,
    read_release_weights,
)
from entityseg.models.checkpoint import (
    NET_CONFIG_KEY,
    TEST_VIEWS_KEY,
    build_network,
    read_checkpoint,
)
from entityseg.models.outputs import CropFormerOutput, DecoderOutput
from entityseg.training import train

MODELS = ["cropformer_tiny", "cropformer_hornet_tiny", "mask2former_tiny"]
KEY_LISTS = [
    "cropformer_swin_large_w7",
    "cropformer_swin_tiny",
    "cropformer_hornet_large",
    "mask2former_swin_large_w7",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data) -> dict:
    """Each reference model converted once: name -> (checkpoint path, its folder)."""
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for name in MODELS:
        folder = shared_data / "official_reference" / name
        paths[name] = (out / f"{name}.ckpt", folder)
        convert_release(folder / "model_final.pth", folder / "config.yaml", paths[name][0])
    return paths


def release_input(outputs: dict, index: int, test_views: dict) -> torch.Tensor:
    """The release's network input: views normalised, then zero-padded to a multiple of 32."""
    views = [outputs[f"{index}.image"]]
    if f"{index}.image_crop" in outputs:
        views += list(outputs[f"{index}.image_crop"])
    mean = torch.tensor(test_views["pixel_mean"]).view(3, 1, 1)
    std = torch.tensor(test_views["pixel_std"]).view(3, 1, 1)
    views = [(v.float() - mean) / std for v in views]
    height = -(-max(v.shape[1] for v in views) // 32) * 32
    width = -(-max(v.shape[2] for v in views) // 32) * 32
    padded = [
        torch.nn.functional.pad(v, (0, width - v.shape[2], 0, height - v.shape[1])) for v in views
    ]
    return torch.stack(padded)[None]  # [1, V, 3, H, W]


@pytest.mark.parametrize("name", MODELS)
def test_converted_network_gives_the_release_outputs(converted, name):
    path, folder = converted[name]
    checkpoint = read_checkpoint(path)
    net = build_network(path, checkpoint=checkpoint).eval()
    reference = torch.load(folder / "outputs.pt", weights_only=True)
    worst = 0.0
    for index in (0, 1):
        with torch.no_grad():
            outputs = net(release_input(reference, index, checkpoint[TEST_VIEWS_KEY]))
        image, batch = outputs.image, outputs.batch
        pairs = [
            (image.logits[0], reference[f"{index}.image_level.pred_logits"]),
            (image.masks[0], reference[f"{index}.image_level.pred_masks"]),
        ]
        recorded_aux = sorted(k for k in reference if k.startswith(f"{index}.image_level.aux"))
        if name.startswith("cropformer"):  # the release recorded every aux prediction's logits
            assert len(recorded_aux) == len(image.aux) == 3
            pairs += [
                (aux.logits[0], reference[f"{index}.image_level.aux{k}.pred_logits"])
                for k, aux in enumerate(image.aux)
            ]
        else:  # its Mask2Former reference holds the final prediction only
            assert recorded_aux == []
        if name.startswith("cropformer"):
            pairs += [
                (batch.logits[0, 0], reference[f"{index}.batch_level.pred_logits"][0]),
                (
                    batch.masks[0],
                    reference[f"{index}.batch_level.pred_masks"][0].transpose(0, 1),
                ),
            ]
            pairs += [
                (aux.logits[0, 0], reference[f"{index}.batch_level.aux{k}.pred_logits"][0])
                for k, aux in enumerate(batch.aux)
            ]
            assert len(batch.aux) == 3
        else:
            assert batch is None
        for ours, release in pairs:
            assert ours.shape == release.shape
            worst = max(worst, (ours - release).abs().max().item())
    assert worst < 1e-4


def reference_outputs_as_ours(reference: dict, index: int, record: dict, mask2former: bool):
    height, width = record["height"], record["width"]
    full = tuple(reference[f"{index}.image"].shape[-2:])
    image = DecoderOutput(
        reference[f"{index}.image_level.pred_logits"][None],
        reference[f"{index}.image_level.pred_masks"][None],
    )
    if mask2former:
        return CropFormerOutput(image), [(0, 0, width, height)], [full], "image_o"
    masks = reference[f"{index}.batch_level.pred_masks"][0].transpose(0, 1)  # [V, Q, h, w]
    logits = reference[f"{index}.batch_level.pred_logits"][0]
    batch = DecoderOutput(logits[None, None].expand(1, len(masks), -1, -1), masks[None])
    boxes = [(0, 0, width, height), *map(tuple, reference[f"{index}.crop_region"].tolist())]
    sizes = [full] + [tuple(reference[f"{index}.image_crop"].shape[-2:])] * 4
    return CropFormerOutput(image, batch), boxes, sizes, "batch_oc"


@pytest.mark.parametrize("name", MODELS)
def test_release_fusion_reproduces_its_entities(shared_data, name):
    folder = shared_data / "official_reference" / name
    reference = torch.load(folder / "outputs.pt", weights_only=True)
    for index, record in enumerate(json.loads((folder / "entities.json").read_text())):
        outputs, boxes, sizes, mode = reference_outputs_as_ours(
            reference, index, record, name.startswith("mask2former")
        )
        entities = fuse_entities(
            outputs,
            torch.tensor([boxes], dtype=torch.float32),
            torch.tensor([sizes]),
            torch.tensor([[record["height"], record["width"]]]),
            mode,
            InferenceSettings(compat="release"),
        )[0]
        assert [r["counts"] for r in entities.rles] == [
            s["counts"] for s in record["segmentations"]
        ]
        assert entities.scores.tolist() == pytest.approx(record["scores"], abs=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_predict_cli_reproduces_the_release(converted, shared_data, tmp_path, name):
    path, folder = converted[name]
    out = tmp_path / "pred"
    result = run_python(
        "-m",
        "entityseg.predict",
        f"ckpt_path={path}",
        f"input={shared_data / 'coco_panoptic_sample/images'}",
        f"output={out}",  # nothing else: the release's views and compat are the checkpoint's
        f"hydra.run.dir={tmp_path}/hydra",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads((out / "predictions.json").read_text())
    for record in json.loads((folder / "entities.json").read_text()):
        ours = [p for p in predictions if p["file_name"] == record["file_name"]]
        assert len(ours) == len(record["scores"])
        for prediction, score, rle in zip(
            ours, record["scores"], record["segmentations"], strict=True
        ):
            a = mask_utils.decode(prediction["segmentation"]).astype(bool)
            b = mask_utils.decode(rle).astype(bool)
            # our network's outputs differ from the release's by float rounding (~1e-5), which
            # can flip a pixel whose fused probability is 0.5 (measured: 2 of 72 masks, 1 pixel)
            assert (a ^ b).sum() <= 2
            assert prediction["score"] == pytest.approx(score, abs=1e-6)


@pytest.mark.parametrize("name", KEY_LISTS)
def test_every_full_size_key_list_converts(shared_data, name):
    key_lists = shared_data / "official_reference/key_lists"
    net_config = net_config_from_release(load_release_config(key_lists / f"config_{name}.yaml"))
    keys = json.loads((key_lists / f"keys_{name}.json").read_text())["keys"]
    source = {k: torch.empty(shape, device="meta") for k, shape, _ in keys}
    state = convert_state_dict(source, network_shapes(net_config), num_fpn_levels(net_config))
    assert len(state) == len(network_shapes(net_config))
    if "hornet" in name:
        assert net_config["decoder"]["num_queries"] == 200


def test_conversion_error_names_every_bad_tensor(shared_data):
    folder = shared_data / "official_reference/cropformer_tiny"
    net_config = net_config_from_release(load_release_config(folder / "config.yaml"))
    source = read_release_weights(folder / "model_final.pth")
    del source["sem_seg_head.predictor.query_feat.weight"]
    source["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    source["sem_seg_head.predictor.class_embed.bias"] = torch.zeros(5)
    with pytest.raises(ReleaseConversionError) as err:
        convert_state_dict(source, network_shapes(net_config), num_fpn_levels(net_config))
    message = str(err.value)
    assert "\n" not in message
    assert "1 no rule for: sem_seg_head.predictor.extra_head.weight" in message
    assert "sem_seg_head.predictor.class_embed.bias [5]" in message
    assert "1 missing: image_decoder.query_feat.weight" in message


def test_cli_converts_and_reports_errors(shared_data, tmp_path):
    folder = shared_data / "official_reference/mask2former_tiny"
    command = ["-m", "entityseg.convert_release"]
    ok = run_python(
        *command, folder / "model_final.pth", folder / "config.yaml", tmp_path / "m2f.ckpt"
    )
    assert ok.returncode == 0, ok.stderr
    assert "245 tensors" in ok.stdout and "MaskFormer" in ok.stdout
    other = shared_data / "official_reference/cropformer_tiny/config.yaml"
    bad = run_python(*command, folder / "model_final.pth", other, tmp_path / "bad.ckpt")
    assert bad.returncode == 2
    assert "missing: association." in bad.stderr and not (tmp_path / "bad.ckpt").exists()


def test_pkl_and_backbone_only_files(shared_data, tmp_path):
    folder = shared_data / "official_reference/cropformer_tiny"
    weights = read_release_weights(folder / "model_final.pth")
    pkl = tmp_path / "model.pkl"  # detectron2's format: numpy arrays under "model"
    with pkl.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in weights.items()}}, f)
    convert_release(pkl, folder / "config.yaml", tmp_path / "from_pkl.ckpt")
    convert_release(folder / "model_final.pth", folder / "config.yaml", tmp_path / "from_pth.ckpt")
    from_pkl = read_checkpoint(tmp_path / "from_pkl.ckpt")["state_dict"]
    from_pth = read_checkpoint(tmp_path / "from_pth.ckpt")["state_dict"]
    assert from_pkl.keys() == from_pth.keys()
    assert all(torch.equal(from_pkl[k], from_pth[k]) for k in from_pkl)

    backbone = {  # an ImageNet-style file: backbone names without prefix, no output norms
        k.removeprefix("backbone."): v
        for k, v in weights.items()
        if k.startswith("backbone.") and not re.match(r"backbone\.norm\d\.", k)
    }
    backbone.update({"head.weight": torch.zeros(10, 256), "norm.weight": torch.ones(256)})
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    convert_release(tmp_path / "backbone.pth", folder / "config.yaml", tmp_path / "bb.ckpt")
    state = read_checkpoint(tmp_path / "bb.ckpt")["state_dict"]
    assert state and all(k.startswith("net.backbone.body.") for k in state)


def test_config_base_chain_and_hornet_blocks(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  A: 1\n  B: {C: 2, D: 3}\nTOP: x\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/child.yaml").write_text("_BASE_: ../base.yaml\nMODEL:\n  B: {D: 4}\n")
    config = load_release_config(tmp_path / "sub/child.yaml")
    assert config["TOP"] == "x"
    assert (config["MODEL"]["A"], config["MODEL"]["B"]) == (1, {"C": 2, "D": 4})
    assert config["MODEL"]["HORNET"]["BASE_DIM"] == 192  # the release's defaults underneath
    spec = "partial(gnconv, order=4, s=1/3, h=24, w=13, gflayer=GlobalLocalFilter)"
    assert parse_gnconv(spec) == {
        "order": 4,
        "s": pytest.approx(1 / 3),
        "h": 24,
        "w": 13,
        "gflayer": "GlobalLocalFilter",
    }
    for bad in ("partial(gnconv, order=__import__('os'))", "gnconv(order=2)", "partial(gnconv,"):
        with pytest.raises(ReleaseConversionError, match="HorNet block"):
            parse_gnconv(bad)


def test_fine_tuning_from_mask2former_starts_the_association_fresh(converted, tmp_path):
    """``model.init_from``: the checkpoint's architecture and weights; association afresh."""
    from test_train import config

    path, _ = converted["mask2former_tiny"]
    cfg = config(
        tmp_path,
        f"model.init_from={path}",
        "model.optimizer.lr=0.0",  # the weights stay the loaded ones
        "trainer.max_steps=1",
        "trainer.check_val_every_n_epoch=100",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "test=false",
    )
    train(cfg)
    saved = read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert saved[NET_CONFIG_KEY]["backbone"]["embed_dim"] == 32  # the release's reduced Swin
    assert saved[NET_CONFIG_KEY]["association"]["enabled"]
    loaded = read_checkpoint(path)["state_dict"]
    trained = saved["state_dict"]
    assert all(torch.equal(trained[k], v) for k, v in loaded.items())
    fresh = set(trained) - set(loaded)
    assert fresh and all(k.startswith("net.association.") for k in fresh)


def test_evaluate_with_release_compat_gives_the_release_entities(converted, coco_sample, tmp_path):
    """``evaluate inference.compat=release`` on the two photos scores the release's entities."""
    from entityseg.data.coco_entity import panoptic_to_entity_json

    path, folder = converted["cropformer_tiny"]
    gt = panoptic_to_entity_json(
        coco_sample / "panoptic.json", coco_sample / "panoptic", tmp_path / "entity.json"
    )
    images = coco_sample / "images"
    result = run_python(
        "-m",
        "entityseg.evaluate",
        f"ckpt_path={path}",
        "data=coco_entity",
        *(f"data.{split}_json={gt}" for split in ("train", "val")),
        *(f"data.{split}_images={images}" for split in ("train", "val")),
        "data.num_workers=0",
        "inference.compat=release",
        "inference.modes=[batch_oc]",
        f"hydra.run.dir={tmp_path}/run",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads((tmp_path / "run/table7.json").read_text())
    assert row["mode"] == "batch_oc"
    predictions = json.loads((tmp_path / "run" / row["predictions"]).read_text())
    file_ids = {i["file_name"]: i["id"] for i in json.loads(gt.read_text())["images"]}
    # AP^e of the release's own entities, scored by pycocotools directly (class-agnostic)
    release = [
        {"image_id": file_ids[r["file_name"]], "segmentation": rle, "score": score}
        for r in json.loads((folder / "entities.json").read_text())
        for rle, score in zip(r["segmentations"], r["scores"], strict=True)
    ]
    expected = pycocotools_ap(gt, release)
    for key in ("AP", "AP50", "AP75"):
        assert row[key] == pytest.approx(expected[key], abs=1e-9), key
    for record in json.loads((folder / "entities.json").read_text()):
        ours = [p for p in predictions if p["image_id"] == file_ids[record["file_name"]]]
        assert [p["segmentation"]["counts"] for p in ours] == [
            s["counts"] for s in record["segmentations"]
        ]
        assert [p["score"] for p in ours] == pytest.approx(record["scores"], abs=1e-4)
