"""``data.photometric``: optional photometric training augmentation, one draw per image."""

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import entityseg.data.photometric as photometric
import entityseg.data.views as views_module
from conftest import REPO, make_datamodule
from entityseg.config import ConfigError, instantiate_checked
from entityseg.data.crops import crop_and_resize
from entityseg.data.photometric import apply_photometric, build_photometric
from entityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from entityseg.data.views import EntityViewsDataset

CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _samples(dataset, count=4, seed=0):
    """``count`` training samples, each drawn after ``torch.manual_seed(seed + i)``."""
    out = []
    for i in range(count):
        torch.manual_seed(seed + i)
        out.append(dataset[i % len(dataset)])
    return out


def _train_dataset(root, **kwargs):
    dm = make_datamodule(root, **kwargs)
    dm.setup("fit")
    return dm.datasets["train"]


def _first_batch(dm, seed):
    L.seed_everything(seed, verbose=False)
    return next(iter(dm.train_dataloader()))


def test_pipeline_keeps_size_and_type_and_repeats_with_the_generator():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    pipeline = build_photometric("default")
    outs = [apply_photometric(pipeline, image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum((o != image).any() for o in outs) >= 4  # most draws change something
    again = apply_photometric(pipeline, image, np.random.default_rng(3))
    assert np.array_equal(again, outs[3])
    with pytest.raises(ValueError, match="uint8"):
        apply_photometric(pipeline, image.astype(np.float32), np.random.default_rng(0))


def test_documented_pipeline_is_the_built_one():
    names = [type(t).__name__ for t in build_photometric("default").transforms]
    assert names and all(f"``{name}``" in photometric.__doc__ for name in names)


def test_off_by_default_changes_nothing(synthetic_set, monkeypatch):
    """Photometric null: the training batch is bit for bit that of a config without the key,
    and the photometric code is never reached."""
    plain = make_datamodule(synthetic_set, batch_size=2)
    off = make_datamodule(synthetic_set, batch_size=2, photometric=None)
    assert plain.hparams.photometric is None
    for dm in (plain, off):
        dm.setup("fit")

    def never(*args, **kwargs):
        raise AssertionError("photometric augmentation ran although it is off")

    monkeypatch.setattr(views_module, "apply_photometric", never)
    a, b = _first_batch(plain, 7), _first_batch(off, 7)
    assert torch.equal(a["images"], b["images"])
    assert torch.equal(a["crop_boxes"], b["crop_boxes"]) and torch.equal(a["flipped"], b["flipped"])
    for views_a, views_b in zip(a["targets"], b["targets"], strict=True):
        for ta, tb in zip(views_a, views_b, strict=True):
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["ids"], tb["ids"])


@pytest.mark.parametrize("augmentation", ["crop_views", "lsj"])
def test_default_changes_pixels_never_geometry_masks_or_boxes(synthetic_set, augmentation):
    kwargs = dict(flip_prob=0.5, train_augmentation=augmentation, lsj_image_size=256)
    off = _samples(_train_dataset(synthetic_set, **kwargs), count=6)
    on = _samples(_train_dataset(synthetic_set, photometric="default", **kwargs), count=6)
    changed = 0
    for a, b in zip(off, on, strict=True):
        assert a["images"].shape == b["images"].shape
        assert torch.equal(a["crop_boxes"], b["crop_boxes"])
        assert (a["flipped"], a["image_size"], a["image_id"]) == (
            b["flipped"],
            b["image_size"],
            b["image_id"],
        )
        for ta, tb in zip(a["targets"], b["targets"], strict=True):
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["ids"], tb["ids"])
        changed += int(not torch.equal(a["images"], b["images"]))
    assert changed >= 3


def test_every_view_gets_the_one_draw(synthetic_set, monkeypatch):
    """The transform runs once per sample, on the full image before the views are cut: both
    views are the recorded transformed image, flipped, cropped and resized."""
    transformed = []

    def recording(pipeline, image, rng):
        out = apply_photometric(pipeline, image, rng)
        transformed.append(out)
        return out

    monkeypatch.setattr(views_module, "apply_photometric", recording)
    dataset = _train_dataset(synthetic_set, photometric="default", flip_prob=0.5)
    for i in range(6):
        torch.manual_seed(i)
        sample = dataset[i % len(dataset)]
        assert len(transformed) == 1  # one draw for the sample
        image = transformed.pop()
        if sample["flipped"]:
            image = np.ascontiguousarray(image[:, ::-1])
        h, w = sample["image_size"]
        for view, box in zip(sample["images"], sample["crop_boxes"].int().tolist(), strict=True):
            expected = crop_and_resize(image, box, (h, w))
            restored = denormalize(view, IMAGENET_MEAN, IMAGENET_STD)
            assert np.abs(restored.astype(int) - expected.astype(int)).max() <= 1


def test_reproducible_with_the_same_seed(synthetic_set):
    dm = make_datamodule(synthetic_set, batch_size=2, photometric="default")
    dm.setup("fit")
    first, again, other = _first_batch(dm, 3), _first_batch(dm, 3), _first_batch(dm, 4)
    assert torch.equal(first["images"], again["images"])
    assert not torch.equal(first["images"], other["images"])
    # a loader worker gets a copy of the pipeline and the same seeded draws
    workers = make_datamodule(
        synthetic_set, batch_size=2, photometric="default", num_workers=1, persistent_workers=False
    )
    workers.setup("fit")
    assert torch.equal(_first_batch(workers, 3)["images"], _first_batch(workers, 3)["images"])


def test_evaluation_images_never_change(synthetic_set):
    on = make_datamodule(synthetic_set, photometric="default")
    off = make_datamodule(synthetic_set)
    on.setup("fit"), off.setup("fit")
    assert on.datasets["val"].photometric is None
    assert torch.equal(on.datasets["val"][0]["images"], off.datasets["val"][0]["images"])
    with pytest.raises(ValueError, match="photometric='default'"):
        EntityViewsDataset(
            off.datasets["val"].records, off.test_views, False, photometric="default"
        )


def test_unknown_name_is_a_one_line_config_error(synthetic_set, tmp_path):
    with pytest.raises(ConfigError) as info:
        make_datamodule(synthetic_set, photometric="x")
    assert info.value.key == "photometric"
    assert str(info.value) == (
        "photometric='x': unknown photometric pipeline; expected one of (None, 'default')"
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data.photometric=x", f"paths.output_dir={tmp_path}"])
    with pytest.raises((ConfigError, SystemExit)) as stop:  # the library raises, a CLI exits
        instantiate_checked(cfg.data, "data")
    (line,) = str(stop.value).splitlines()
    assert "data.photometric='x': unknown photometric pipeline" in line


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_off_in_every_experiment(experiment, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
        )
    assert cfg.data.photometric is None
