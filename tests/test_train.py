"""Training end to end: fast_dev_run, resume after a kill, NaN stop, DDP, a sweep + tables."""

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, collected_table, run_python
from entityseg.config import ConfigError
from entityseg.hub.card import read_card_info
from entityseg.training import train

TINY_RUN = [
    "experiment=demo",
    "data.num_workers=0",
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=2",
    "data.synthetic.height=96",
    "data.synthetic.width=128",
    "data.size_scale=0.16",
    "model.criterion.num_points=256",
]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                *TINY_RUN,
                f"paths.data_dir={tmp_path}/data",
                f"paths.output_dir={tmp_path}/run",
                *overrides,
            ],
        )


def test_fast_dev_run_trains_validates_and_tests(tmp_path, capsys):
    metrics, _ = train(config(tmp_path, "+trainer.fast_dev_run=true", "test=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"test/ap_image_o", "test/ap_batch_oc", "test/ap50_batch_c"} <= set(metrics)
    printed = capsys.readouterr().out  # the end of fit: validation's Table 7, the run's folder
    table = printed.split("AP^e of the last validation:\n")[1]
    assert table.startswith("| Decoder | AP^e | AP^e_50 | AP^e_75 | forward (ms) |")
    assert f"| Batch-OC | {metrics['val/ap_batch_oc']:.1f} |" in table
    assert f"Run folder: {tmp_path / 'run'}" in printed


def test_killed_run_resumes_to_the_same_step_count(tmp_path):
    common = [
        "data.synthetic.num_train=6",
        "trainer.max_steps=8",  # 3 steps an epoch
        "trainer.check_val_every_n_epoch=100",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "test=false",
    ]
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="simulated kill at step 5"):
        train(
            config(
                tmp_path,
                *common,
                "+callbacks.crash._target_=training_callbacks.CrashAtStep",
                "+callbacks.crash.step=5",
            )
        )
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # mid-epoch
    assert not list(last.parent.glob("*.tmp"))  # atomic writes leave no partial file
    train(config(tmp_path, *common, f"ckpt_path={last}"))
    assert torch.load(last, weights_only=True)["global_step"] == 8  # as if never killed
    with pytest.raises(ConfigError) as finished:  # resuming a finished run: one line, no fit
        train(config(tmp_path, *common, f"ckpt_path={last}"))
    assert str(finished.value) == (
        f"ckpt_path={str(last)!r}: its run already trained 8 of trainer.max_steps=8 steps: "
        f"nothing is left to resume. To fine-tune from it, give model.init_from={last} instead "
        "(its weights, a new step count); to train on, raise trainer.max_steps"
    )
    # the same training checkpoint starts a fine-tuning (model.init_from=): both read it with
    # weights_only=True (optimiser, loops and hyper-parameters included); the fine-tuning takes
    # the weights only and counts its own steps from 0 (a resumed run would be at step 8)
    tuned = tmp_path / "tuned"
    tune = [f"model.init_from={last}", f"paths.output_dir={tuned}", "trainer.max_steps=2"]
    train(config(tmp_path, *common, *tune))
    assert torch.load(tuned / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    card = read_card_info(tuned / "checkpoints")  # beside the checkpoint it describes
    assert card.base_model == str(last) and card.recipe["steps"] == 2 and card.metrics == {}


class NaNCriterion(torch.nn.Module):
    def __init__(self, **loss_weights):
        super().__init__()

    def forward(self, outputs, targets):
        nan = outputs.image.masks.sum() * float("nan")
        return {"loss": nan, "image/ce": nan}


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(
            config(
                tmp_path,
                "model.criterion._target_=test_train.NaNCriterion",
                "~model.criterion.class_weight",
                "trainer.max_steps=3",
            )
        )


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    dump = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = run_python(
        "-m",
        "entityseg.train",
        *TINY_RUN,
        "trainer=ddp_cpu",
        "trainer.max_steps=2",
        "trainer.check_val_every_n_epoch=1",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
        f"hydra.run.dir={tmp_path}/run",
        "data.synthetic.num_val=4",
        "+callbacks.dump._target_=training_callbacks.DumpRankState",
        f"+callbacks.dump.out_dir={dump}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == [1, 2, 3, 4]  # all val images
    assert len(ranks[0]["local"]) == 2  # each rank evaluated half of them


@pytest.mark.slow
def test_a_small_sweep_and_its_table(tmp_path):
    result = run_python(
        "-m",
        "entityseg.train",
        "-m",
        *TINY_RUN,
        "hparams_search=table9_delta",
        "hydra.sweeper.params={data.crop_delta:'0.6,0.7'}",
        "trainer.max_steps=2",
        "trainer.check_val_every_n_epoch=1",  # one epoch (2 steps), validated: val metrics
        f"paths.data_dir={tmp_path}/data",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = collected_table(tmp_path / "sweep")  # the demo runs no test: val metrics
    assert lines[0].startswith("| delta | AP^e (val) | AP^e_50 (val) | AP^e_75 (val) |")
    assert lines[2].startswith("| 0.6 |") and lines[2].endswith("| 40.2 |")
    assert lines[3].startswith("| 0.7 |") and lines[3].endswith("| 41.0 |")
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    for line, run in zip(lines[2:], runs, strict=True):  # our numbers, as the runs logged them
        metrics = json.loads(run.read_text())
        assert line.split(" | ")[1:4] == [
            f"{metrics[f'val/{name}_batch_oc']:.1f}" for name in ("ap", "ap50", "ap75")
        ]


def test_collecting_runs_without_the_metric_fails_loudly(tmp_path):
    run = tmp_path / "sweep/0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra/overrides.yaml").write_text("- data.crop_delta=0.6\n")
    (run / "metrics.json").write_text(json.dumps({"train/loss": 1.0}))
    result = run_python("scripts/collect_tables.py", tmp_path / "sweep", timeout=120)
    assert result.returncode != 0
    assert "logged no val AP^e of batch_oc" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "overrides",
    [
        # the release's CropFormer training views (crops by their own edge, invisible entities
        # kept) and dense points (its one-step reference) instead of importance sampling
        [
            "data.train_crop_resize=own",
            "data.keep_invisible_entities=true",
            "model.criterion.num_points=null",
        ],
        # the Mask2Former baseline's large-scale jitter: one view, padded masks as released
        [
            "model=mask2former",
            "data.train_augmentation=lsj",
            "data.lsj_mask_pad_value=1",
            "optimized_metric=val/ap_image_o",
        ],
    ],
    ids=["release_crop_views", "lsj"],
)
def test_release_training_switches_train_end_to_end(tmp_path, overrides):
    metrics, _ = train(config(tmp_path, "+trainer.fast_dev_run=1", "test=false", *overrides))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert ("train/batch/ce" in metrics) != ("model=mask2former" in overrides)
