"""Collect a Hydra multirun into the paper's tables (markdown + csv), paper numbers beside ours.

    python scripts/collect_tables.py outputs/train/multiruns/<time> [--metric-split auto]

Reads each run's ``.hydra/overrides.yaml`` (the swept values) and ``metrics.json`` (written by
``entityseg.train``), and writes ``table.md`` and ``table.csv`` into the multirun folder. The
swept keys decide the table: ``inference.modes`` (Table 7, from ``entityseg.evaluate -m``),
``data.crop_delta`` (Table 9a), ``data.train_crop_layout`` /
``data.test_crop_layout`` (Table 9b), ``model.net.association.*`` (Table 9c); other sweeps get
a plain table without paper numbers. Our AP^e comes from the split the runs logged
(``--metric-split auto``: ``test`` when every run has test metrics, else ``val``; the split
is named in the header); a run without that metric stops the collection with one line naming
it, instead of leaving a blank cell.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

# CropFormer Swin-L on EntitySeg, AP^e (paper Table 9).
PAPER = {
    "inference.modes": {  # Table 7, CropFormer rows
        ("[image_o]",): 39.3,
        ("[batch_o]",): 39.1,
        ("[batch_c]",): 40.2,
        ("[batch_oc]",): 41.0,
    },
    "data.crop_delta": {("0.5",): 38.5, ("0.6",): 40.2, ("0.7",): 41.0, ("0.8",): 40.9},
    "data.train_crop_layout,data.test_crop_layout": {
        ("random", "fixed4"): 39.7,
        ("fixed4", "fixed4"): 41.0,
        ("fixed4", "fixed8"): 41.3,
        ("fixed8", "fixed8"): 41.0,
    },
    "model.net.association.satt,model.net.association.ffn": {
        ("false", "false"): 40.7,
        ("false", "true"): 40.8,
        ("true", "false"): 40.8,
        ("true", "true"): 41.0,
    },
}
NAMES = {
    "inference.modes": "mode",
    "data.crop_delta": "delta",
    "data.train_crop_layout": "train crops",
    "data.test_crop_layout": "test crops",
    "model.net.association.satt": "SAtt",
    "model.net.association.ffn": "FFN",
}


def read_runs(multirun: Path) -> list[tuple[dict[str, str], dict[str, float]]]:
    """(swept key -> value, metrics) of every finished run of a multirun folder."""
    runs = []
    for overrides_file in sorted(multirun.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            print(f"skipped {run_dir}: no metrics.json (unfinished run?)")
            continue
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()))
        runs.append((overrides, json.loads(metrics_file.read_text())))
    if not runs:
        raise SystemExit(f"{multirun}: no finished runs (no */metrics.json)")
    return runs


def swept_keys(runs) -> list[str]:
    """Override keys whose value differs between runs, in the order they were given."""
    keys = list(runs[0][0])
    return [k for k in keys if len({r[0].get(k) for r in runs}) > 1]


def metric_split(runs, requested: str, mode: str) -> str:
    """``val`` or ``test``: the requested split, or with ``auto`` the one every run logged."""
    if requested != "auto":
        return requested
    for split in ("test", "val"):
        if all(
            _run_metric(overrides, metrics, split, mode, "ap") is not None
            for overrides, metrics in runs
        ):
            return split
    return "val"  # the table reports which run lacks it


def _run_metric(overrides, metrics, split: str, mode: str, name: str) -> float | None:
    """The run's metric; None if it was not logged, NaN if it was logged as NaN (``null`` in
    ``metrics.json``: AP^e without ground-truth entities)."""
    run_mode = overrides.get("inference.modes", f"[{mode}]").strip("[]")  # Table 7 sweeps
    key = f"{split}/{name}_{run_mode}"
    if key not in metrics:
        return None
    return float("nan") if metrics[key] is None else metrics[key]


def table(runs, split: str, mode: str = "batch_oc") -> tuple[list[str], list[list]]:
    keys = swept_keys(runs)
    paper = PAPER.get(",".join(keys), {})
    names = ("AP^e", "AP^e_50", "AP^e_75")
    header = [NAMES.get(k, k) for k in keys] + [f"{n} ({split})" for n in names] + ["paper AP^e"]
    rows = []
    for overrides, metrics in runs:
        values = tuple(overrides[k] for k in keys)
        ours = [_run_metric(overrides, metrics, split, mode, n) for n in ("ap", "ap50", "ap75")]
        if any(value is None for value in ours):
            raise SystemExit(
                f"run {dict(overrides)} logged no {split} AP^e of {mode} (metrics.json keys: "
                f"{sorted(metrics)}): validate it (trainer.check_val_every_n_epoch) or choose "
                "--metric-split"
            )
        paper_value = paper.get(tuple(v.lower() for v in values))
        rows.append([*values, *map(_number, ours), _number(paper_value)])
    return header, rows


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun", type=Path)
    parser.add_argument("--metric-split", default="auto", choices=["auto", "val", "test"])
    parser.add_argument("--mode", default="batch_oc")
    args = parser.parse_args()
    runs = read_runs(args.multirun)
    header, rows = table(runs, metric_split(runs, args.metric_split, args.mode), args.mode)
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    )
    (args.multirun / "table.md").write_text(markdown + "\n")
    with open(args.multirun / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print(markdown)


if __name__ == "__main__":
    main()
