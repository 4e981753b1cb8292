"""Train CropFormer: ``python -m entityseg.train experiment=cropformer_swinl``.

Instantiates the data module, the LightningModule, callbacks, loggers and trainer from
``conf/train.yaml``; fits (resuming from ``ckpt_path`` if given); tests the best checkpoint;
returns the metric named by ``optimized_metric`` so that ``-m`` sweeps can use it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from entityseg.config import instantiate_checked
from entityseg.models.checkpoint import fine_tuning_net_config, read_checkpoint, stored_net_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], str]:
    """Fit and test as configured: the logged metrics (also in ``metrics.json``) and the path
    of the best checkpoint by ``optimized_metric`` (the last one if there is none)."""
    L.seed_everything(cfg.seed, workers=True)
    _take_network_from_init_checkpoint(cfg)
    datamodule = instantiate_checked(cfg.data, "data")
    model = instantiate_checked(cfg.model, "model")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = _best_checkpoint(trainer)
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    out = Path(cfg.paths.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return metrics, best


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
        raise SystemExit(f"config error: model.init_from={init_from!r}: {err}") from None
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


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.optimized_metric)
    if value is None:
        log.warning("optimized_metric %s was not logged", cfg.optimized_metric)
    return value


if __name__ == "__main__":
    main()
