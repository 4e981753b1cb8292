"""Evaluate a checkpoint: AP^e of every inference mode, like the paper's Table 7.

``python -m entityseg.evaluate ckpt_path=... [data=...] [inference.modes=[image_o,batch_oc]]``
writes to its output folder one COCO results json per mode (``predictions_<mode>.json``),
``table7.md`` and ``table7.json`` (AP^e, AP^e_50, AP^e_75 and the median forward time per
image, data loading excluded). ``inference.precision=bf16`` runs the network under bf16
autocast; ``model.compile=true`` compiles its backbone and pixel decoder (``torch.compile``).
A progress bar follows the network over the images; then one log line names each mode as
pycocotools scores it.

The images and annotations come from ``data``; the test views (sizes, crops, normalisation)
and ``inference.compat`` from the checkpoint, as :class:`~entityseg.api.EntitySegmenter` reads
them: ``data.<test key>=...`` given on the command line (e.g. ``data.test_crop_layout=fixed8``)
overrides the checkpoint's, and a checkpoint that stores no views takes the ``data`` config's.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import hydra
from omegaconf import DictConfig

from entityseg.api import INFERENCE_KEYS, EntitySegmenter
from entityseg.config import (
    CONFIG_DIR,
    command_line_keys,
    exits_on_config_error,
    instantiate_checked,
)
from entityseg.data.datamodule import TEST_VIEW_KEYS, view_keys
from entityseg.data.errors import EntityDataError
from entityseg.evaluation.entity_ap import evaluate as entity_ap
from entityseg.evaluation.entity_ap import metrics_json
from entityseg.inference.cuda_graphs import check_cuda_graphs
from entityseg.inference.fusion import INFERENCE_MODES
from entityseg.inference.runner import ModeResults, check_precision, resolve_view_chunk
from entityseg.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

PAPER_NAMES = {
    "image_o": "Image-O",
    "batch_o": "Batch-O",
    "batch_c": "Batch-C",
    "batch_oc": "Batch-OC",
}


#: ``metrics.json`` key prefix -> row key, the names ``train.py`` logs (for collect_tables.py)
METRIC_KEYS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "forward_ms": "forward_ms"}


def check_modes(modes) -> None:
    """Stop at once, in one line, on a mode that is not one of Table 7's four."""
    unknown = [m for m in modes if m not in INFERENCE_MODES]
    if unknown:
        raise SystemExit(
            f"config error: inference mode {unknown[0]!r} is unknown; expected one of "
            f"{list(INFERENCE_MODES)}"
        )


def segmenter_from_config(cfg: DictConfig) -> EntitySegmenter:
    """The segmenter of ``cfg.ckpt_path`` with the ``inference`` settings of ``cfg``.

    Test views: the checkpoint's, with the ``data.*`` test keys that the command line sets on
    top (:func:`~entityseg.config.command_line_keys`; an experiment's or a data config's
    values do not count); a checkpoint that stores none takes the ``data`` config's, and one
    that stores no network configuration is loaded into ``model.net``. ``inference.compat:
    null`` is the checkpoint's (``release`` for a converted release checkpoint).
    """
    data_keys = view_keys(cfg.data)
    given = command_line_keys("data") & set(TEST_VIEW_KEYS)
    try:
        return EntitySegmenter.from_checkpoint(
            cfg.ckpt_path,
            cfg.inference.mode,
            cfg.inference.device,
            cfg.inference.precision,
            default_views=data_keys,
            network=lambda: instantiate_checked(cfg.model.net, "model.net"),
            compile=cfg.model.compile,
            **{key: cfg.inference[key] for key in INFERENCE_KEYS},
            **{key: data_keys[key] for key in sorted(given)},
        )
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"ckpt_path={cfg.ckpt_path}: {err}") from None


def table_rows(results: dict[str, ModeResults], gt_json: str, out_dir: Path) -> list[dict]:
    """Write each mode's predictions json and score it with AP^e."""
    rows = []
    for number, (mode, result) in enumerate(results.items(), start=1):
        predictions = [r for image_id, e in result.entities.items() for r in e.to_coco(image_id)]
        path = out_dir / f"predictions_{mode}.json"
        path.write_text(json.dumps(predictions))
        log.info(
            "scoring mode %d/%d, %s (%s): AP^e of %d entities on %d images (pycocotools)",
            number,
            len(results),
            PAPER_NAMES[mode],
            mode,
            len(predictions),
            len(result.entities),
        )
        metrics = entity_ap(gt_json, predictions)
        rows.append(
            {
                "mode": mode,
                "decoder": PAPER_NAMES[mode],
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "AP75": metrics["AP75"],
                "forward_ms": statistics.median(result.forward_ms),
                "predictions": path.name,
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| Decoder | AP^e | AP^e_50 | AP^e_75 | forward (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['decoder']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
            f"{r['forward_ms']:.0f} |"
            for r in rows
        ),
    ]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exits_on_config_error
def main(cfg: DictConfig) -> float:
    check_modes(cfg.inference.modes)
    check_precision(cfg.inference.precision)
    check_cuda_graphs(cfg.inference.cuda_graphs)
    resolve_view_chunk(cfg.inference.view_chunk, "cpu")  # checked now, resolved per device
    segmenter = segmenter_from_config(cfg)
    # the data set of ``data``, viewed as the segmenter views images
    datamodule = instantiate_checked(cfg.data, "data", for_training=False, **segmenter.view_keys)
    try:
        datamodule.prepare_data()
        datamodule.setup("test")
        gt_json = datamodule.hparams.test_json or datamodule.hparams.val_json
        results = segmenter.run(
            datamodule.test_dataloader(), list(cfg.inference.modes), description="evaluating"
        )
    except EntityDataError as err:  # AP^e over fewer images would not be AP^e: stop, name it
        raise SystemExit(f"evaluation stopped: {err}") from None
    out_dir = Path(cfg.paths.output_dir)
    rows = table_rows(results, gt_json, out_dir)
    (out_dir / "table7.json").write_text(metrics_json(rows, indent=2))
    metrics = {f"test/{k}_{r['mode']}": r[m] for r in rows for k, m in METRIC_KEYS.items()}
    (out_dir / "metrics.json").write_text(metrics_json(metrics, indent=2, sort_keys=True))
    (out_dir / "table7.md").write_text(markdown_table(rows))
    print(markdown_table(rows))
    log.info("wrote %s", out_dir / "table7.md")
    return rows[-1]["AP"]


if __name__ == "__main__":
    main()
