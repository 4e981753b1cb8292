"""Every experiment named after a release config composes to that config's recipe, key by key.

The references are the release's own detectron2 configs as it ran them (every key, defaults
included): ``../shared/data/official_reference/key_lists/config_*.yaml`` for the full models and
the reduced ``official_reference/*/config.yaml`` (small networks, the release's recipes). Each
release key is read with :func:`entityseg.interop.release.load_release_config` and compared
with the key of ours that implements it, or with the behaviour it stands for (the schedule from
``CropFormerModule.configure_optimizers``, the batch per device from the trainer's world size).
Without the shared data the tests skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO, SHARED_DATA, run_python, tiny_model
from entityseg.config import ConfigError
from entityseg.data.crops import STRIDE_RATIO, crop_boxes
from entityseg.interop.release import load_release_config, net_config_from_release
from entityseg.lit_module import CropFormerModule
from entityseg.training import apply_global_batch_size, check_release_init, train

REFERENCE = SHARED_DATA / "official_reference"

#: experiment -> the release's full config (key_lists) it reproduces
FULL = {
    "cropformer_swinl": "key_lists/config_cropformer_swin_large_w7.yaml",
    "cropformer_swint": "key_lists/config_cropformer_swin_tiny.yaml",
    "cropformer_hornet_l": "key_lists/config_cropformer_hornet_large.yaml",
    "mask2former_swinl": "key_lists/config_mask2former_swin_large_w7.yaml",
}
#: experiment -> the reduced release config with its recipe (the network is smaller)
REDUCED = {
    "cropformer_swint": "cropformer_tiny/config.yaml",
    "cropformer_hornet_l": "cropformer_hornet_tiny/config.yaml",
    "mask2former_swint": "mask2former_tiny/config.yaml",
}
#: MODEL.WEIGHTS of the release's training yamls (qqlu/Entity, Entityv2/CropFormer/configs/
#: entityv2/entity_segmentation/*_3x.yaml); the key_lists dumps have it cleared ('')
RELEASE_WEIGHTS = {
    "cropformer_swinl": "entityv2_50ep_with_coco_same_epoch_swinlarge_w7_model_final.pth",
    "mask2former_swinl": "entityv2_50ep_with_coco_same_epoch_swinlarge_w7_model_final.pth",
    "cropformer_swint": "entityv2_50ep_with_coco_same_epoch_model_final.pth",
    "mask2former_swint": "entityv2_50ep_with_coco_same_epoch_model_final.pth",
    "cropformer_hornet_l": "hornet_l_pretrained.pth",
}


#: The release's EntitySeg splits (its register_entityv2_entity.py): image folder and json,
#: relative to the data root's entityseg/
RELEASE_SPLITS = {
    "entityv2_entity_train_01": (
        "images/entity_01_11580",
        "annotations/entity_segmentation/entityv2_01_entity_train.json",
    ),
    "entityv2_entity_train_02": (
        "images/entity_02_11598",
        "annotations/entity_segmentation/entityv2_02_entity_train.json",
    ),
    "entityv2_entity_train_03": (
        "images/entity_03_10049",
        "annotations/entity_segmentation/entityv2_03_entity_train.json",
    ),
    "entityv2_entity_val_all": (
        "images",
        "annotations/entity_segmentation/entityv2_010203_entity_val.json",
    ),
    "entityv2_entity_val_all_lr": (
        "images_lr",
        "annotations/entity_segmentation/entityv2_010203_entity_val_lr.json",
    ),
}
ROOT = "/entityseg"  # paths.entityseg_root in these tests


def release_config(relative: str) -> dict:
    path = REFERENCE / relative
    if not path.is_file():
        message = f"release reference config not found: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return load_release_config(path)


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.entityseg_root={ROOT}", *overrides, "paths.output_dir=/tmp/unused"],
        )


def get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# --------------------------------------------------------------------------- the table
#: (release key, our key): the same value
SAME_VALUE = [
    ("SOLVER.IMS_PER_BATCH", "data.global_batch_size"),
    ("SOLVER.MAX_ITER", "trainer.max_steps"),
    ("SOLVER.BASE_LR", "model.optimizer.lr"),
    ("SOLVER.WEIGHT_DECAY", "model.optimizer.weight_decay"),
    ("SOLVER.BACKBONE_MULTIPLIER", "model.optimizer.backbone_lr_factor"),
    ("SOLVER.WEIGHT_DECAY_NORM", "model.optimizer.norm_weight_decay"),
    ("SOLVER.WEIGHT_DECAY_EMBED", "model.optimizer.embedding_weight_decay"),
    ("SOLVER.POLY_LR_POWER", "model.scheduler.power"),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "trainer.gradient_clip_val"),
    ("INPUT.MIN_SIZE_TRAIN", "data.train_short_sizes"),
    ("INPUT.MAX_SIZE_TRAIN", "data.train_max_size"),
    ("INPUT.MIN_SIZE_TEST", "data.test_short_size"),
    ("INPUT.MAX_SIZE_TEST", "data.test_max_size"),
    ("MODEL.PIXEL_MEAN", "data.pixel_mean"),
    ("MODEL.PIXEL_STD", "data.pixel_std"),
    ("MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "model.criterion.num_points"),
    ("MODEL.MASK_FORMER.OVERSAMPLE_RATIO", "model.criterion.oversample_ratio"),
    ("MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO", "model.criterion.importance_sample_ratio"),
    ("MODEL.MASK_FORMER.CLASS_WEIGHT", "model.criterion.class_weight"),
    ("MODEL.MASK_FORMER.MASK_WEIGHT", "model.criterion.mask_weight"),
    ("MODEL.MASK_FORMER.DICE_WEIGHT", "model.criterion.dice_weight"),
    ("MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", "model.criterion.no_entity_weight"),
    ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "model.net.decoder.num_queries"),
    ("MODEL.MASK_FORMER.HIDDEN_DIM", "model.net.decoder.hidden_dim"),
    ("MODEL.MASK_FORMER.NHEADS", "model.net.decoder.num_heads"),
    ("MODEL.MASK_FORMER.DIM_FEEDFORWARD", "model.net.decoder.ffn_dim"),
    ("MODEL.MASK_FORMER.PRE_NORM", "model.net.decoder.pre_norm"),
    ("ENTITY.CROP_AREA_RATIO", "data.crop_delta"),
]
#: release keys whose values a reduced config shrinks (compared on the full configs only)
REDUCED_KEYS = {
    "INPUT.MIN_SIZE_TEST",
    "INPUT.MAX_SIZE_TEST",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
    "MODEL.MASK_FORMER.HIDDEN_DIM",
    "MODEL.MASK_FORMER.NHEADS",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "MODEL.MASK_FORMER.DEC_LAYERS",
    "drop path",
}


def recipe_rows(release: dict, cfg, reduced: bool) -> list[tuple[str, object, object]]:
    """(release key, release value, our value) for every recipe key of the release."""
    ours = OmegaConf.to_container(cfg, resolve=True)
    rows = [(key, get(release, key), get(ours, our_key)) for key, our_key in SAME_VALUE]
    solver, inputs, entity = release["SOLVER"], release["INPUT"], release["ENTITY"]
    former, model = release["MODEL"]["MASK_FORMER"], release["MODEL"]
    trainer, data, net = ours["trainer"], ours["data"], ours["model"]["net"]
    clip = solver["CLIP_GRADIENTS"]
    mapper = {"crop_views": "entity_crop", "lsj": "coco_instance_lsj"}[data["train_augmentation"]]
    test_crops = crop_boxes(600, 800, data["test_crop_layout"], data["crop_delta"])
    at_the_end = (
        trainer["check_val_every_n_epoch"] is None
        and trainer["val_check_interval"] == trainer["max_steps"]
    )
    train_parts = zip(data["train_images"], data["train_json"], strict=True)
    rows += [
        # 9 decoder layers + the prediction on the learnable queries
        ("MODEL.MASK_FORMER.DEC_LAYERS", former["DEC_LAYERS"], net["decoder"]["num_layers"] + 1),
        ("MODEL.MASK_FORMER.DEEP_SUPERVISION", former["DEEP_SUPERVISION"], True),
        ("MODEL.META_ARCHITECTURE", model["META_ARCHITECTURE"],
         "CropFormer" if net["association"]["enabled"] else "MaskFormer"),
        # AdamW and the poly schedule without warm-up: see the schedule test
        ("SOLVER.OPTIMIZER", solver["OPTIMIZER"], "ADAMW"),
        ("SOLVER.LR_SCHEDULER_NAME", solver["LR_SCHEDULER_NAME"], "WarmupPolyLR"),
        ("SOLVER.WARMUP_ITERS", solver["WARMUP_ITERS"], 0),
        ("SOLVER.WARMUP_FACTOR", solver["WARMUP_FACTOR"], 1.0),
        ("SOLVER.POLY_LR_CONSTANT_ENDING", solver["POLY_LR_CONSTANT_ENDING"], 0.0),
        ("SOLVER.CLIP_GRADIENTS.ENABLED", clip["ENABLED"], trainer["gradient_clip_val"] > 0),
        # Lightning's "norm" clips the L2 norm of all parameters' gradients together
        ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip["CLIP_TYPE"],
         "full_model" if trainer["gradient_clip_algorithm"] == "norm" else None),
        ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", clip["NORM_TYPE"], 2.0),
        # AMP: fp16 in the release, bf16 autocast in ours (a deliberate difference)
        ("SOLVER.AMP.ENABLED", solver["AMP"]["ENABLED"],
         trainer["precision"] in ("bf16-mixed", "16-mixed")),
        ("INPUT.MIN_SIZE_TRAIN_SAMPLING", inputs["MIN_SIZE_TRAIN_SAMPLING"], "choice"),
        ("INPUT.RANDOM_FLIP", inputs["RANDOM_FLIP"],
         "horizontal" if data["flip_prob"] == 0.5 else None),
        ("INPUT.DATASET_MAPPER_NAME", inputs["DATASET_MAPPER_NAME"], mapper),
        ("ENTITY.CROP_STRIDE_RATIO", entity["CROP_STRIDE_RATIO"], STRIDE_RATIO),
        ("ENTITY.CROP_SAMPLE_NUM_TRAIN", entity["CROP_SAMPLE_NUM_TRAIN"], 1),  # V = 2
        ("ENTITY.CROP_SAMPLE_NUM_TEST", entity["CROP_SAMPLE_NUM_TEST"], len(test_crops)),
        # evaluation only at the end: the period is longer than the run
        ("TEST.EVAL_PERIOD > SOLVER.MAX_ITER",
         release["TEST"]["EVAL_PERIOD"] > solver["MAX_ITER"], at_the_end),
        ("DATASETS.TRAIN", [RELEASE_SPLITS[n] for n in release["DATASETS"]["TRAIN"]],
         [(relative(images), relative(json_path)) for images, json_path in train_parts]),
        ("DATASETS.TEST", [RELEASE_SPLITS[n] for n in release["DATASETS"]["TEST"]],
         [(relative(data["val_images"]), relative(data["val_json"]))]),
    ]  # fmt: skip
    if inputs["DATASET_MAPPER_NAME"] == "coco_instance_lsj":
        rows += [
            ("INPUT.IMAGE_SIZE", inputs["IMAGE_SIZE"], data["lsj_image_size"]),
            ("INPUT.MIN_SCALE", inputs["MIN_SCALE"], data["lsj_scale"][0]),
            ("INPUT.MAX_SCALE", inputs["MAX_SCALE"], data["lsj_scale"][1]),
        ]
    else:  # the release's crop mapper sizes crops by their own short side, keeps lost entities
        rows += [
            ("crop views sized on their own", True, data["train_crop_resize"] == "own"),
            ("entities no view shows stay targets", True, data["keep_invisible_entities"]),
        ]
    backbone = model["BACKBONE"]["NAME"]
    drop_path = model["SWIN" if backbone == "D2SwinTransformer" else "HORNET"]["DROP_PATH_RATE"]
    rows.append(("drop path", drop_path, ours["model"]["backbone"]["drop_path_rate"]))
    if reduced:
        rows = [row for row in rows if row[0] not in REDUCED_KEYS]
    return rows


def relative(path: str) -> str:
    assert path.startswith(ROOT + "/"), path
    return path[len(ROOT) + 1 :]


def assert_rows_equal(rows) -> None:
    wrong = [f"{key}: release {want!r}, ours {got!r}" for key, want, got in rows if want != got]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("experiment", sorted(FULL))
def test_experiment_composes_to_the_release_recipe(experiment):
    release = release_config(FULL[experiment])
    cfg = compose_train(f"experiment={experiment}")
    rows = recipe_rows(release, cfg, reduced=False)
    assert len(rows) >= 50
    assert_rows_equal(rows)
    assert cfg.init_from_release.weights == RELEASE_WEIGHTS[experiment]


@pytest.mark.parametrize("experiment", sorted(REDUCED))
def test_experiment_has_the_recipe_of_the_reduced_release_config(experiment):
    release = release_config(REDUCED[experiment])
    cfg = compose_train(f"experiment={experiment}")
    assert_rows_equal(recipe_rows(release, cfg, reduced=True))
    assert cfg.init_from_release.weights == RELEASE_WEIGHTS[experiment]


#: backbone keys that the model name fixes (timm's / our HorNet's registered configurations;
#: their parameter counts are checked against the release in tests/models/test_release_sizes.py)
IMPLIED_BY_NAME = {"embed_dim", "depths", "num_heads", "window_size", "mlp_ratio"}
IMPLIED_BY_NAME |= {"base_dim", "orders", "scale", "gf_sizes"}


@pytest.mark.parametrize("experiment", sorted(FULL))
def test_experiment_network_is_the_release_network(experiment):
    """Every key the release config gives the network, read by ``net_config_from_release``."""
    from inspect import signature

    from entityseg.models.association import AssociationModule
    from entityseg.models.backbone import TimmBackbone
    from entityseg.models.image_decoder import MaskedAttentionDecoder
    from entityseg.models.pixel_decoder import MSDeformAttnPixelDecoder

    release = net_config_from_release(release_config(FULL[experiment]))
    cfg = compose_train(f"experiment={experiment}")
    ours = OmegaConf.to_container(cfg.model.net, resolve=True)
    classes = {
        "backbone": TimmBackbone,
        "pixel_decoder": MSDeformAttnPixelDecoder,
        "decoder": MaskedAttentionDecoder,
        "association": AssociationModule,
    }
    wrong, compared = [], 0
    for part, keys in release.items():
        defaults = signature(classes[part]).parameters
        for key, want in keys.items():
            if part == "backbone" and key in IMPLIED_BY_NAME:
                continue
            if key in ours[part]:
                got = ours[part][key]
            elif key in defaults:
                got = defaults[key].default
            else:
                wrong.append(f"{part}.{key}: release {want!r}, ours has no such key")
                continue
            got = list(got) if isinstance(got, tuple) else got
            compared += 1
            if got != want:
                wrong.append(f"{part}.{key}: release {want!r}, ours {got!r}")
    assert not wrong, "\n".join(wrong)
    assert compared >= 20


@pytest.mark.parametrize("experiment", sorted(REDUCED))
def test_experiment_network_has_the_reduced_release_structure(experiment):
    """The reduced configs are smaller networks of the same kind: compare what is not a size."""
    release = net_config_from_release(release_config(REDUCED[experiment]))
    cfg = compose_train(f"experiment={experiment}")
    ours = OmegaConf.to_container(cfg.model.net, resolve=True)
    assert ours["backbone"]["name"].split("_")[0] == release["backbone"]["name"].split("_")[0]
    for key in ("transformer_in_features", "norm", "num_points"):
        assert ours["pixel_decoder"][key] == release["pixel_decoder"][key], key
    assert ours["decoder"]["pre_norm"] == release["decoder"]["pre_norm"]
    for key in ("enabled", "share_decoder"):
        assert ours["association"][key] == release["association"][key], key


# --------------------------------------------------------------------------- schedule
def release_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """detectron2's WarmupPolyLR with WARMUP_ITERS 0 and POLY_LR_CONSTANT_ENDING 0."""
    return base_lr * (1.0 - iteration / max_iter) ** power


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize(
    "experiment", ["cropformer_swinl", "cropformer_swint", "mask2former_swinl"]
)
def test_optimizer_and_schedule_follow_the_release(experiment):
    release = release_config(FULL[experiment])
    solver = release["SOLVER"]
    cfg = compose_train(f"experiment={experiment}")
    module = CropFormerModule(
        net=tiny_model(),
        criterion=instantiate(cfg.model.criterion),
        optimizer=OmegaConf.to_container(cfg.model.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.model.scheduler, resolve=True),
        inference=OmegaConf.to_container(cfg.inference, resolve=True),
    )
    module.trainer = SimpleNamespace(max_steps=cfg.trainer.max_steps)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.AdamW
    assert configured["lr_scheduler"]["interval"] == "step"  # detectron2 steps every iteration

    backbone = {id(p) for p in module.net.backbone.parameters()}
    factors = [
        solver["BACKBONE_MULTIPLIER"] if id(group["params"][0]) in backbone else 1.0
        for group in optimizer.param_groups
    ]
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= backbone or not ids & backbone  # one lr per group
    for kind, key in (
        ((torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm2d), "WEIGHT_DECAY_NORM"),
        (torch.nn.Embedding, "WEIGHT_DECAY_EMBED"),
    ):
        modules = [m for m in module.net.modules() if isinstance(m, kind)]
        assert modules, kind
        for m in modules:
            assert all(decay_of[id(p)] == solver[key] for p in m.parameters(recurse=False)), key
    assert decay_of[id(module.net.image_decoder.heads.class_embed.weight)] == solver["WEIGHT_DECAY"]

    max_iter = solver["MAX_ITER"]
    for step in (0, 1, max_iter // 2, max_iter - 1, max_iter):
        scheduler.last_epoch = step - 1
        scheduler.step()  # the lr of optimiser step `step`
        for group, factor in zip(optimizer.param_groups, factors, strict=True):
            want = release_lr(solver["BASE_LR"] * factor, step, max_iter, solver["POLY_LR_POWER"])
            assert group["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), (step, factor)


class RecordValidationSteps(L.Callback):
    """Remember the global step of every validation run (not the sanity check)."""

    steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            RecordValidationSteps.steps.append(trainer.global_step)


def test_validation_only_at_the_end_as_the_release(tmp_path):
    """The release experiments' two trainer keys validate once, after the last step."""
    cfg = compose_train("experiment=cropformer_swinl")
    assert cfg.trainer.check_val_every_n_epoch is None
    assert OmegaConf.to_container(cfg.trainer)["val_check_interval"] == "${trainer.max_steps}"
    tiny = [  # the demo, with the release experiments' validation keys
        "experiment=demo",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=${trainer.max_steps}",
        "trainer.max_steps=6",  # 3 epochs of 2 steps
        "test=false",
        "data.num_workers=0",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=1",
        "data.synthetic.height=96",
        "data.synthetic.width=128",
        "data.size_scale=0.16",
        "model.criterion.num_points=256",
        f"paths.data_dir={tmp_path}/data",
        "+callbacks.record._target_=test_release_recipes.RecordValidationSteps",
    ]
    RecordValidationSteps.steps = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = compose("train", overrides=[*tiny, f"paths.output_dir={tmp_path}/run"])
    train(run)
    assert RecordValidationSteps.steps == [6]


# --------------------------------------------------------------------------- global batch
@pytest.mark.parametrize(
    ("experiment", "devices", "nodes", "per_device"),
    [
        ("cropformer_swinl", 8, 1, 1),
        ("cropformer_swinl", 2, 1, 4),
        ("cropformer_swinl", 1, 1, 8),
        ("cropformer_hornet_l", 4, 2, 1),
        ("cropformer_swint", 8, 1, 2),
        ("mask2former_swinl", 4, 1, 4),
    ],
)
def test_global_batch_holds_on_any_dividing_device_count(experiment, devices, nodes, per_device):
    cfg = compose_train(
        f"experiment={experiment}",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        f"trainer.num_nodes={nodes}",
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.world_size == devices * nodes
    apply_global_batch_size(cfg, trainer.world_size)
    assert cfg.data.batch_size == per_device
    assert cfg.data.batch_size * devices * nodes == cfg.data.global_batch_size


def test_global_batch_that_does_not_divide_stops_with_one_line():
    cfg = compose_train("experiment=cropformer_swinl", "trainer.devices=3")
    with pytest.raises(ConfigError) as info:
        apply_global_batch_size(cfg, 3)
    message = str(info.value)
    assert message.startswith("data.global_batch_size=8: not divisible")
    assert "world size 3" in message and "\n" not in message


def test_null_global_batch_keeps_the_batch_size():
    cfg = compose_train("experiment=demo")
    assert cfg.data.global_batch_size is None
    apply_global_batch_size(cfg, 4)
    assert cfg.data.batch_size == 2


# --------------------------------------------------------------------------- init_from
@pytest.mark.parametrize("experiment", sorted(RELEASE_WEIGHTS))
def test_release_experiment_without_init_from_stops_at_once(experiment):
    cfg = compose_train(f"experiment={experiment}")
    with pytest.raises(ConfigError) as info:
        train(cfg)  # stops before anything is built (no data, no GPU needed)
    message = str(info.value)
    assert message.startswith("model.init_from=None: ") and "\n" not in message
    weights = RELEASE_WEIGHTS[experiment]
    assert f"python -m entityseg.convert_release {weights} " in message
    assert cfg.init_from_release.config in message


def test_init_from_or_no_release_init_passes_the_check():
    check_release_init(compose_train("experiment=cropformer_swinl", "model.init_from=x.ckpt"))
    check_release_init(compose_train("experiment=cropformer_swinl", "init_from_release=null"))
    check_release_init(compose_train("experiment=demo"))


def test_train_command_names_the_file_to_convert(tmp_path):
    result = run_python(
        "-m", "entityseg.train", "experiment=cropformer_hornet_l", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error: model.init_from=None: ")
    assert "hornet_l_pretrained.pth cropformer_hornet_3x.yaml" in lines[-1]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- EntitySeg layout
PARTS = ("entity_01_11580", "entity_02_11598", "entity_03_10049")


@pytest.fixture()
def entityseg_root(synthetic_set, tmp_path):
    """A four-image EntitySeg in its authors' layout: three training parts (images 0-1, 2, 3)
    with their own folders, and the 010203 validation json at both resolutions."""
    root = tmp_path / "entityseg"
    data = json.loads((synthetic_set / "annotations.json").read_text())
    ann_dir = root / "annotations/entity_segmentation"
    ann_dir.mkdir(parents=True)
    part_of = [0, 0, 1, 2]
    val = {**data, "images": []}
    for index, image in enumerate(data["images"]):
        part = PARTS[part_of[index]]
        for images in ("images", "images_lr"):
            (root / images / part).mkdir(parents=True, exist_ok=True)
            shutil.copy(synthetic_set / "images" / image["file_name"], root / images / part)
        val["images"].append({**image, "file_name": f"{part}/{image['file_name']}"})
    for number in range(1, len(PARTS) + 1):
        ids = {img["id"] for i, img in enumerate(data["images"]) if part_of[i] == number - 1}
        subset = {
            **data,
            "images": [img for img in data["images"] if img["id"] in ids],
            "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
        }
        (ann_dir / f"entityv2_0{number}_entity_train.json").write_text(json.dumps(subset))
    for suffix in ("", "_lr"):
        (ann_dir / f"entityv2_010203_entity_val{suffix}.json").write_text(json.dumps(val))
    return root


def entityseg_datamodule(root, *overrides):
    cfg = compose_train("data=entityseg", f"paths.entityseg_root={root}", "data.num_workers=0",
                        "data.size_scale=0.25", *overrides)  # fmt: skip
    return instantiate(cfg.data)


@pytest.mark.parametrize(("resolution", "images"), [("high", "images"), ("low", "images_lr")])
def test_entityseg_trains_on_three_parts_and_validates_at_the_chosen_resolution(
    entityseg_root, resolution, images
):
    dm = entityseg_datamodule(entityseg_root, f"data.resolution={resolution}")
    dm.setup("fit")
    folders = [r.path.parent.name for r in dm.datasets["train"].records]
    assert folders == [PARTS[0], PARTS[0], PARTS[1], PARTS[2]]
    assert all(r.path.is_file() for r in dm.datasets["train"].records)
    suffix = "" if resolution == "high" else "_lr"
    assert dm.hparams.val_json.endswith(f"entityv2_010203_entity_val{suffix}.json")
    val = dm.datasets["val"].records
    assert [r.path.parent.parent.name for r in val] == [images] * 4
    assert [r.path.parent.name for r in val] == folders
    assert min(dm.datasets["train"][0]["image_size"]) in dm.train_views.short_sizes


def test_entityseg_is_high_resolution_by_default():
    cfg = compose_train("data=entityseg")
    assert cfg.data.resolution == "high"
    assert cfg.data.val_json.endswith("entity_segmentation/entityv2_010203_entity_val.json")
    assert cfg.data.val_images.endswith("entityseg/images")


def test_unknown_resolution_names_the_key(entityseg_root):
    with pytest.raises(Exception) as info:
        entityseg_datamodule(entityseg_root, "data.resolution=medium")
    cause = info.value.__cause__ or info.value
    assert isinstance(cause, ConfigError) and cause.key == "resolution"


def test_missing_part_names_the_key_and_the_path(entityseg_root):
    missing = entityseg_root / "annotations/entity_segmentation/entityv2_02_entity_train.json"
    missing.unlink()
    with pytest.raises(Exception) as info:
        entityseg_datamodule(entityseg_root)
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError)
    assert str(cause) == f"train_json={str(missing)!r}: annotation file not found"
    one = missing.parent / "entityv2_01_entity_train.json"
    with pytest.raises(Exception) as info:
        entityseg_datamodule(entityseg_root, f"data.train_json=['{one}']")
    assert info.value.__cause__.key == "train_images"  # 3 folders for 1 json


def test_parts_sharing_an_image_id_are_refused(entityseg_root):
    ann_dir = entityseg_root / "annotations/entity_segmentation"
    first = json.loads((ann_dir / "entityv2_01_entity_train.json").read_text())
    third = ann_dir / "entityv2_03_entity_train.json"
    data = json.loads(third.read_text())
    old, new = data["images"][0]["id"], first["images"][0]["id"]
    data["images"][0]["id"] = new
    for ann in data["annotations"]:
        ann["image_id"] = new if ann["image_id"] == old else ann["image_id"]
    third.write_text(json.dumps(data))
    dm = entityseg_datamodule(entityseg_root)
    with pytest.raises(ConfigError, match=f"image id {new} is in both .*01_entity_train.json and"):
        dm.setup("fit")


def test_mask2former_hornet_l_is_the_release_mask2former_hornet_3x():
    """The one release config without a full dump here: its training yaml's keys
    (mask2former_hornet_3x.yaml: MaskFormer, 200 queries, LSJ, 103,125 iterations, the base's
    batch of 16) on the HorNet-L network of cropformer_hornet_l without the association."""
    ours = compose_train("experiment=mask2former_hornet_l")
    hornet = compose_train("experiment=cropformer_hornet_l")
    net, cropformer = (OmegaConf.to_container(c.model.net, resolve=True) for c in (ours, hornet))
    assert net["association"]["enabled"] is False
    assert {k: v for k, v in net.items() if k != "association"} == {
        k: v for k, v in cropformer.items() if k != "association"
    }
    assert net["decoder"]["num_queries"] == 200
    assert ours.trainer.max_steps == 103125 and ours.data.global_batch_size == 16
    assert ours.data.train_augmentation == "lsj" and ours.optimized_metric == "val/ap_image_o"
    assert list(ours.model.optimizer.decayed_norms) == ["backbone"]
