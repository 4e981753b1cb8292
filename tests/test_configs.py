"""The Hydra config tree composes, and bad values stop a run with one line naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO, run_python

CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


def compose_config(name, overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.data._target_ == "entityseg.data.datamodule.EntityDataModule"
    assert cfg.model.backbone.name and cfg.trainer._target_.startswith("lightning")


@pytest.mark.parametrize("search", SEARCHES)
def test_every_sweep_composes(search, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=demo", f"hparams_search={search}"],
            return_hydra_config=True,
        )
    params = cfg.hydra.sweeper.params
    assert params, search
    for key in params:
        assert OmegaConf.select(cfg, key) is not None, f"{search} sweeps unknown key {key}"


def test_eval_config_composes(tmp_path):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt"], tmp_path)
    assert list(cfg.inference.modes) == ["image_o", "batch_o", "batch_c", "batch_oc"]


def test_lightning_parts_instantiate(tmp_path):
    cfg = compose_config("train", ["experiment=demo"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 320
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "LearningRateMonitor"}
    assert type(instantiate(cfg.logger.tensorboard)).__name__ == "TensorBoardLogger"


def run_preview(tmp_path, *overrides):
    return run_python(
        "-m",
        "entityseg.data.preview",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",
        "data.num_workers=0",
        "data.synthetic.num_train=2",
        "data.synthetic.num_val=1",
        "data.synthetic.height=96",
        "data.synthetic.width=128",
        *overrides,
        timeout=300,
    )


def test_preview_runs_the_pipeline_end_to_end(tmp_path):
    result = run_preview(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "views.png").is_file()
    assert (tmp_path / "data/synthetic/train/annotations.json").is_file()
    assert "images" in result.stdout and "targets" in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_delta=1.5", "data.crop_delta=1.5: must be in (0, 1]"),
        (
            "data.train_crop_layout=diagonal",
            "data.train_crop_layout='diagonal': unknown crop layout",
        ),
        ("data.batch_size=-1", "data.batch_size=-1: must be a positive integer"),
        ("data.train_augmentation=mosaic", "data.train_augmentation='mosaic': unknown"),
        ("data.synthetic=null", "data.train_json="),
    ],
)
def test_bad_values_stop_the_run_with_one_line(tmp_path, override, message):
    result = run_preview(tmp_path, override)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(tmp_path / "run" / "views.png").exists()
