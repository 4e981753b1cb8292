"""The paper's Table 7 for one run: AP^e and forward time of every inference mode.

Written by ``python -m entityseg.evaluate`` and the demo: each mode's COCO results json
(``predictions_<mode>.json``), scored by :func:`~entityseg.evaluation.entity_ap.evaluate`, as
rows and as a markdown table.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from entityseg.evaluation.entity_ap import evaluate as entity_ap
from entityseg.inference.runner import ModeResults
from entityseg.inference.settings import INFERENCE_MODES, PAPER_NAMES

log = logging.getLogger(__name__)

#: ``metrics.json`` key prefix -> row key, the names ``train.py`` logs (for collect_tables.py)
METRIC_KEYS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "forward_ms": "forward_ms"}


def flat_metrics(rows: list[dict], split: str = "test") -> dict[str, float]:
    """Table 7 rows as the flat metrics training logs (``test/ap50_batch_oc``), for
    ``metrics.json`` and the model card."""
    return {f"{split}/{k}_{r['mode']}": r[m] for r in rows for k, m in METRIC_KEYS.items()}


def rows_from_metrics(metrics: Mapping[str, float], split: str = "val") -> list[dict]:
    """Table 7 rows of the modes logged in flat metrics (``val/ap_batch_oc``, ...: the inverse
    of :func:`flat_metrics`), without forward times: what training prints at its end."""
    rows = []
    for mode in INFERENCE_MODES:
        if f"{split}/ap_{mode}" in metrics:
            row = {"mode": mode, "decoder": PAPER_NAMES[mode], "forward_ms": None}
            row.update(
                {
                    m: metrics[f"{split}/{k}_{mode}"]
                    for k, m in METRIC_KEYS.items()
                    if k != "forward_ms"
                }
            )
            rows.append(row)
    return rows


def mode_predictions(
    results: Mapping[str, ModeResults],
) -> tuple[dict[str, list[dict]], dict[str, list[float]]]:
    """Each mode's COCO results (images in the order run) and forward times (ms), as
    :func:`table_rows` takes them, from :meth:`EntitySegmenter.run
    <entityseg.api.EntitySegmenter.run>`'s results."""
    predictions = {
        mode: [r for image_id, e in result.entities.items() for r in e.to_coco(image_id)]
        for mode, result in results.items()
    }
    return predictions, {mode: result.forward_ms for mode, result in results.items()}


def table_rows(
    predictions: Mapping[str, list[dict]],
    forward_ms: Mapping[str, Sequence[float]],
    gt_json: str,
    out_dir: Path,
) -> list[dict]:
    """Write each mode's predictions json and score it with AP^e; the forward time of a
    row is the median of the mode's per-image times."""
    rows = []
    for number, mode in enumerate(predictions, start=1):
        path = out_dir / f"predictions_{mode}.json"
        path.write_text(json.dumps(predictions[mode]))
        log.info(
            "scoring mode %d/%d, %s (%s): AP^e of %d entities (pycocotools)",
            number,
            len(predictions),
            PAPER_NAMES[mode],
            mode,
            len(predictions[mode]),
        )
        metrics = entity_ap(gt_json, predictions[mode])
        rows.append(
            {
                "mode": mode,
                "decoder": PAPER_NAMES[mode],
                "AP": metrics["AP"],
                "AP50": metrics["AP50"],
                "AP75": metrics["AP75"],
                "forward_ms": statistics.median(forward_ms[mode]),
                "predictions": path.name,
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as the paper prints Table 7: decoder, AP^e, AP^e_50, AP^e_75, time."""
    lines = [
        "| Decoder | AP^e | AP^e_50 | AP^e_75 | forward (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['decoder']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
            f"{'-' if r['forward_ms'] is None else format(r['forward_ms'], '.0f')} |"
            for r in rows
        ),
    ]
    return "\n".join(lines) + "\n"
