"""Train CropFormer: ``python -m entityseg.train experiment=cropformer_swinl``.

Fits and tests as :func:`entityseg.training.train` does with ``conf/train.yaml`` and returns
the metric named by ``optimized_metric``, so that ``-m`` sweeps can use it.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from entityseg.config import CONFIG_DIR, exits_on_config_error
from entityseg.training import train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exits_on_config_error
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.optimized_metric)
    if value is None:
        log.warning("optimized_metric %s was not logged", cfg.optimized_metric)
    return value


if __name__ == "__main__":
    main()
