"""The paper's Table 7 for one run: AP^e and forward time of every inference mode.

Written by ``python -m entityseg.evaluate`` and the demo: each mode's COCO results json
(``predictions_<mode>.json``), scored by :func:`~entityseg.evaluation.entity_ap.evaluate`, as
rows and as a markdown table.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from entityseg.evaluation.entity_ap import evaluate as entity_ap
from entityseg.inference.runner import ModeResults
from entityseg.inference.settings import PAPER_NAMES

log = logging.getLogger(__name__)

#: ``metrics.json`` key prefix -> row key, the names ``train.py`` logs (for collect_tables.py)
METRIC_KEYS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "forward_ms": "forward_ms"}


def flat_metrics(rows: list[dict], split: str = "test") -> dict[str, float]:
    """Table 7 rows as the flat metrics training logs (``test/ap50_batch_oc``), for
    ``metrics.json`` and the model card."""
    return {f"{split}/{k}_{r['mode']}": r[m] for r in rows for k, m in METRIC_KEYS.items()}


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
    """The rows as the paper prints Table 7: decoder, AP^e, AP^e_50, AP^e_75, time."""
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
