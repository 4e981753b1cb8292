"""The model card of a model we made: from its training run's config and last evaluation.

Training writes it beside its best checkpoint at the end of ``fit`` (:func:`run_card` with the
run's config and metrics); :meth:`~entityseg.api.EntitySegmenter.save_pretrained` and
``export format=pretrained`` make it again from a checkpoint's run folder
(:func:`checkpoint_card`: ``<run>/config.yaml`` and ``<run>/metrics.json`` beside
``<run>/checkpoints/``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from entityseg import zoo
from entityseg.data.views import ViewConfig
from entityseg.hub.card import CardInfo, architecture_of, metrics_by_mode

log = logging.getLogger(__name__)

#: Our own models' licence unless they derive from a release model (whose licence they keep).
OWN_LICENSE = "apache-2.0"


def run_card(
    cfg: DictConfig,
    metrics: Mapping[str, float],
    net_config: Mapping[str, Any],
    base_model: str | None = None,
    steps: int | None = None,
) -> CardInfo:
    """The card of a training run: ``cfg`` (the composed ``conf/train.yaml``), its logged
    ``metrics`` (``metrics.json``: the test split's when tested, else validation's), the
    network it trained and what it started from (``base_model``: the ``model.init_from``
    given, a released model's name or a Hub repository)."""
    data = cfg.data
    recipe = {
        "experiment": cfg.get("task_name"),
        "steps": steps if steps is not None else cfg.trainer.get("max_steps"),
        "global_batch": data.get("global_batch_size") or data.get("batch_size"),
        "lr": cfg.model.get("optimizer", {}).get("lr"),
        "data": {k: _plain(data.get(k)) for k in ("train_json", "train_images", "val_json")},
        **_test_sizes(data),
    }
    return CardInfo(
        name=str(cfg.get("task_name") or "entityseg-model"),
        license=_license(base_model),
        architecture=architecture_of(net_config),
        backbone=str(net_config["backbone"]["name"]),
        num_queries=int(net_config["decoder"]["num_queries"]),
        metrics=metrics_by_mode(metrics),
        dataset=dataset_name(data),
        base_model=base_model,
        recipe={k: v for k, v in recipe.items() if v is not None},
    )


def checkpoint_card(
    checkpoint: Path | None, net_config: Mapping[str, Any], origin: Mapping[str, Any]
) -> CardInfo:
    """The card of a model loaded from ``checkpoint``: its run's (``<run>/config.yaml`` and
    ``metrics.json`` beside ``<run>/checkpoints/``) when there is one, else a card of the
    network alone. A checkpoint converted from a release file keeps the release's licence."""
    run = checkpoint.parent.parent if checkpoint is not None else None
    if (
        run is not None
        and checkpoint.parent.name == "checkpoints"
        and (run / "config.yaml").is_file()
    ):
        cfg = OmegaConf.load(run / "config.yaml")
        metrics_path = run / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        base = cfg.get("base_model") or cfg.model.get("init_from")
        return run_card(cfg, metrics, net_config, str(base) if base else None)
    release = "weights" in origin  # entityseg.convert_release's record of the release file
    return CardInfo(
        name=checkpoint.stem if checkpoint is not None else "entityseg-model",
        license=zoo.LICENSE if release else OWN_LICENSE,
        architecture=architecture_of(net_config),
        backbone=str(net_config["backbone"]["name"]),
        num_queries=int(net_config["decoder"]["num_queries"]),
        recipe={"converted_from": Path(origin["weights"]).name} if release else {},
    )


def dataset_name(data: Mapping[str, Any]) -> str:
    """What a run's data is called on its card: ``synthetic``, ``EntitySeg``, or the stem of
    its validation json."""
    if data.get("synthetic") is not None:
        return "synthetic"
    if data.get("resolution") is not None:
        return "EntitySeg"
    val_json = data.get("val_json")
    return Path(str(val_json)).stem if val_json else "unknown"


def _test_sizes(data: Mapping[str, Any]) -> dict[str, int]:
    """The test sizes the run validated at (``size_scale`` applied)."""
    views = ViewConfig.from_keys(ViewConfig.test_keys_of(data))
    return {"test_short_size": views.short_sizes[0], "test_max_size": views.max_size}


def _license(base_model: str | None) -> str:
    """A model fine-tuned from a release model keeps the release's licence."""
    if base_model and (base_model in zoo.NAMES or base_model.startswith(zoo.REPO_ID)):
        return zoo.LICENSE
    return OWN_LICENSE


def _plain(value: Any) -> Any:
    """A config value as json (lists of paths stay lists)."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
