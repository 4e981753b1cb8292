"""Parameters, forward time and peak memory of a CropFormer config (random weights).

    python scripts/benchmark_model.py [--backbone swin_large] [--height 800 --width 1216]
        [--views 1 5] [--device cpu|cuda] [--runs 3] [--threads N] [--overrides k=v ...]

Builds ``model.net`` from ``conf/`` (the release's sizes by default), times
``forward(images[1, V, 3, H, W])`` after one warm-up run (median of ``--runs``; CUDA is
synchronised) and reports peak memory (CUDA max allocated; CPU peak RSS of the process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"


def build_model(backbone: str, overrides: list[str]) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model/backbone={backbone}", *overrides])
    return instantiate(cfg.model.net)


def time_forward(model, images: torch.Tensor, runs: int) -> list[float]:
    cuda = images.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first run is warm-up
                times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="swin_large")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.backbone, args.overrides).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for views in args.views:
        images = torch.randn(1, views, 3, args.height, args.width, device=args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_forward(model, images, args.runs)
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(
            dict(
                backbone=args.backbone,
                views=views,
                height=args.height,
                width=args.width,
                device=args.device,
                threads=torch.get_num_threads(),
                params_m=params / 1e6,
                median_ms=statistics.median(times),
                min_ms=min(times),
                max_ms=max(times),
                peak_mem_mb=peak,
            )
        )
    print(
        "| backbone | V | size | device | threads | params (M) | median ms | min-max ms | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['views']} | {r['height']}x{r['width']} | {r['device']} | "
            f"{r['threads']} | {r['params_m']:.1f} | {r['median_ms']:.0f} | "
            f"{r['min_ms']:.0f}-{r['max_ms']:.0f} | {r['peak_mem_mb']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
