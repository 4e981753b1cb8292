"""Training as configured: the library half of ``python -m entityseg.train`` (and the demo).

Instantiates callbacks, loggers and trainer, then the data module and the LightningModule from
a composed ``conf/train.yaml``; fits (resuming from ``ckpt_path`` if given); tests the best
checkpoint. Before anything is built, a release experiment (``init_from_release``) must be
given the converted release weights (``model.init_from``); ``data.global_batch_size`` becomes
the per-device ``data.batch_size`` once the trainer knows its world size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from entityseg import zoo
from entityseg.config import ConfigError, instantiate_checked
from entityseg.evaluation.entity_ap import metrics_json
from entityseg.evaluation.table7 import markdown_table, rows_from_metrics
from entityseg.hub import HubError, resolve_model
from entityseg.hub.card import write_model_card
from entityseg.hub.release import release_init_folder
from entityseg.hub.run_card import run_card
from entityseg.inference.settings import InferenceSettings
from entityseg.models.checkpoint import (
    CheckpointError,
    fine_tuning_net_config,
    read_checkpoint,
    stored_net_config,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], str]:
    """Fit and test as configured: the logged metrics (also in ``metrics.json``) and the path
    of the best checkpoint by ``optimized_metric`` (the last one if there is none).

    Settings that cannot work raise :class:`~entityseg.config.ConfigError` before anything
    is built.
    """
    InferenceSettings.from_config(cfg.inference)  # validation's settings, checked at once
    resolve_init_from(cfg)
    check_release_init(cfg)
    check_resume_checkpoint(cfg)
    _take_network_from_init_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    apply_global_batch_size(cfg, trainer.world_size)
    datamodule = instantiate_checked(cfg.data, "data")
    model = instantiate_checked(cfg.model, "model")
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = _best_checkpoint(trainer)
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    out = Path(cfg.paths.output_dir)
    (out / "metrics.json").write_text(metrics_json(metrics, indent=2, sort_keys=True))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if best and trainer.is_global_zero:  # the model card beside the checkpoint it describes
        card = run_card(
            cfg, metrics, model.net.config, cfg.get("base_model"), steps=trainer.global_step
        )
        log.info("model card: %s", write_model_card(Path(best).parent, card))
    if trainer.is_global_zero:
        _print_summary(metrics, best, out)
    return metrics, best


def _print_summary(metrics: dict[str, float], best: str, out: Path) -> None:
    """The last validation's AP^e of every mode (as ``evaluate`` prints Table 7), and where
    the run's files are."""
    rows = rows_from_metrics(metrics, "val")
    if rows:
        print(f"\nAP^e of the last validation:\n{markdown_table(rows)}")
    print(f"Run folder: {out}" + (f"\nBest checkpoint: {best}" if best else ""))


def resolve_init_from(cfg: DictConfig) -> str | None:
    """``model.init_from`` as a local file or model folder: a released model's name or a Hub
    repository (:func:`entityseg.hub.resolve_model`) is fetched, converted once and cached.
    Returns what the user gave (the card's ``base_model``); a model the Hub does not give
    stops in one line."""
    given = cfg.model.get("init_from")
    if not given:
        return None
    try:
        path = resolve_model(given)
    except HubError as err:
        raise ConfigError("model.init_from", given, str(err)) from None
    with open_dict(cfg):
        cfg.model.init_from = str(path)
        cfg.base_model = cfg.get("base_model") or str(given)  # the card's, as the user named it
    return str(given)


def check_release_init(cfg: DictConfig) -> None:
    """Give a release experiment its starting weights, or stop at once.

    ``init_from_release`` (``{weights, config}``: the release's ``MODEL.WEIGHTS`` file and the
    release yaml it converts with) marks an experiment that, like the release, fine-tunes from
    released weights; without ``model.init_from`` it would silently train from scratch. Where
    the release's Hub repository holds the file (:data:`entityseg.zoo.PRETRAINED_FOLDER`), it
    is downloaded and converted for the experiment's network (once, cached) and becomes
    ``model.init_from``; else the message says how to convert it by hand.
    """
    release = cfg.get("init_from_release")
    if not release or cfg.model.get("init_from"):
        return
    weights, config = release.get("weights"), release.get("config")
    net_config = OmegaConf.to_container(cfg.model.net, resolve=True)
    net_config.pop("_target_", None)
    try:
        folder = release_init_folder(weights, net_config)
        reason = f"{zoo.REPO_ID}/{zoo.PRETRAINED_FOLDER} holds no {weights}"
    except HubError as err:
        folder, reason = None, str(err)
    if folder is not None:
        log.info("starting weights %s from the Hub: %s", weights, folder)
        with open_dict(cfg):
            cfg.model.init_from = str(folder)
            cfg.base_model = f"{zoo.REPO_ID}/{zoo.PRETRAINED_FOLDER}/{weights}"
        return
    raise ConfigError(
        "model.init_from",
        None,
        f"{cfg.get('task_name', 'this experiment')} starts, as the release, from {weights}; "
        f"convert it with `python -m entityseg.convert_release {weights} {config} init.ckpt` "
        "and add model.init_from=init.ckpt (or init_from_release=null to start from scratch)"
        f" [not fetched: {reason}]",
    )


def check_resume_checkpoint(cfg: DictConfig) -> None:
    """Read ``ckpt_path`` as Lightning will resume from it (``weights_only=True``), so that a
    wrong, broken or crafted file, or a run with no step left to train (a finished run, where
    ``model.init_from`` was meant), stops in one line before anything is built."""
    if cfg.get("ckpt_path") is None:
        return
    try:
        checkpoint = read_checkpoint(cfg.ckpt_path)
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError("ckpt_path", cfg.ckpt_path, str(err)) from None
    steps, max_steps = checkpoint.get("global_step"), cfg.trainer.get("max_steps")
    if isinstance(steps, int) and isinstance(max_steps, int) and 0 < max_steps <= steps:
        raise ConfigError(
            "ckpt_path",
            cfg.ckpt_path,
            f"its run already trained {steps} of trainer.max_steps={max_steps} steps: nothing "
            f"is left to resume. To fine-tune from it, give model.init_from={cfg.ckpt_path} "
            "instead (its weights, a new step count); to train on, raise trainer.max_steps",
        )


def apply_global_batch_size(cfg: DictConfig, world_size: int) -> None:
    """``data.batch_size`` = ``data.global_batch_size`` / world size (devices x nodes).

    The release's ``SOLVER.IMS_PER_BATCH`` is the batch over all GPUs, so the recipe holds on
    any number of devices that divides it; ``global_batch_size: null`` keeps ``batch_size``.
    """
    total = cfg.data.get("global_batch_size")
    if total is None:
        return
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ConfigError("data.global_batch_size", total, "must be a positive integer or null")
    if total % world_size:
        raise ConfigError(
            "data.global_batch_size",
            total,
            f"not divisible by the world size {world_size} (trainer.devices x "
            "trainer.num_nodes); choose devices that divide it",
        )
    with open_dict(cfg):
        cfg.data.batch_size = total // world_size
    log.info(
        "batch %d per device x %d devices = global batch %d", total // world_size, world_size, total
    )


def _take_network_from_init_checkpoint(cfg: DictConfig) -> None:
    """With ``model.init_from``, build the network the checkpoint was saved from.

    Its stored architecture replaces ``model.net``'s (training settings such as drop path and
    the association switches stay the config's), so fine-tuning a converted release checkpoint
    needs no other flag.
    """
    init_from = cfg.model.get("init_from")
    if not init_from:
        return
    try:
        stored = stored_net_config(read_checkpoint(init_from))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("model.init_from", init_from, str(err)) from None
    if stored is None:  # a bare state dict: the configured network must fit it
        return
    configured = OmegaConf.to_container(cfg.model.net, resolve=True)
    with open_dict(cfg):
        cfg.model.net = fine_tuning_net_config(configured, stored)
    log.info("network architecture from %s", init_from)


def _best_checkpoint(trainer: L.Trainer) -> str:
    """The best checkpoint by the monitored metric, else the newest ``last.ckpt``."""
    paths = [cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.monitor]
    paths += [cb.last_model_path for cb in trainer.checkpoint_callbacks]
    return next((p for p in paths if p), "")
