"""Where the forward time goes: entityseg's network and HF Mask2Former, part by part.

    python scripts/profile_parts.py --backbone swin_large --height 800 --width 1216 \
        --device cuda --precision bf16 [--runs 10] [--views 1 5] [--kernels OUT.txt]

Each part runs on the previous part's (cached) output, synchronised, median of ``--runs``
after ``--warmup`` runs: backbone, pixel decoder, image decoder, association + batch decoder
(views > 1), and the whole forward. HF's Mask2Former (built by ``scripts/benchmark.py`` from the
same config) is split into its backbone, pixel-level module and the whole model. With
``--kernels`` the top kernels of one forward of each (``torch.profiler``) are written there:
the table that says what to optimise next. Models, sizes and options are those of the
benchmark (``--overrides`` included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from entityseg.inference.settings import InferenceSettings  # noqa: E402


def median_ms(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        benchmark.synchronize(device)
        start = time.perf_counter()
        fn()
        benchmark.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def entityseg_parts(net, images: torch.Tensor, view_chunk) -> dict[str, Callable[[], object]]:
    """Closures that run one part each on cached inputs (computed once here)."""
    v = images.shape[1]
    flat = images.flatten(0, 1)
    features = net.backbone(flat)
    mask_features, multi_scale = net.pixel_decoder(features)
    _, view_queries = net.image_decoder(multi_scale, mask_features)
    parts = {
        "backbone": lambda: net.backbone(flat),
        "pixel decoder": lambda: net.pixel_decoder(features),
        "image decoder": lambda: net.image_decoder(multi_scale, mask_features),
    }
    if v > 1 and net.has_batch_decoder:
        parts["association + batch decoder"] = lambda: net.batch_level(
            view_queries, multi_scale, mask_features, v
        )
    parts["whole forward"] = lambda: net(images, batch_level=v > 1, view_chunk=view_chunk)
    return parts


def hf_parts(hf, pixel_values: torch.Tensor) -> dict[str, Callable[[], object]]:
    pixel_module = hf.model.pixel_level_module
    return {
        "backbone": lambda: pixel_module.encoder(pixel_values),
        "backbone + pixel decoder": lambda: pixel_module(pixel_values),
        "whole forward": lambda: hf(pixel_values=pixel_values),
    }


def kernel_table(fn: Callable[[], object], device: torch.device, rows: int = 25) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        benchmark.synchronize(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    backbones = sorted(p.stem for p in (benchmark.CONF / "model" / "backbone").glob("*.yaml"))
    parser.add_argument("--backbone", default="swin_tiny", choices=backbones)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--views", type=int, nargs="+", default=[1], choices=(1, 5, 9))
    parser.add_argument("--no-hf", dest="hf", action="store_false")
    parser.add_argument("--kernels", type=Path, help="write the top-kernel tables here")
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    args.experiment = None
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_parts: --device cuda needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = benchmark.compose_config(args)
    net = instantiate(cfg.model.net).eval().to(device)
    if cfg.model.get("compile"):
        net.compile_parts()
    hf = benchmark.build_hf_model(cfg, device) if args.hf else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tables = []
    with torch.inference_mode(), autocast:
        for views in args.views:
            images = benchmark.random_views(views, args.height, args.width, device)
            view_chunk = InferenceSettings.from_config(cfg.inference).views_at_once(device)
            models = [("entityseg", entityseg_parts(net, images, view_chunk))]
            if hf is not None and views == 1:
                models.append(("hf_mask2former", hf_parts(hf, images[:, 0])))
            for name, parts in models:
                print(f"\n{name}, {views} view(s), {args.height} x {args.width}, {args.precision}")
                for part, fn in parts.items():
                    print(f"  {part:30s} {median_ms(fn, args.runs, args.warmup, device):9.2f} ms")
                if args.kernels:
                    table = kernel_table(parts["whole forward"], device)
                    tables.append(f"## {name}, {views} view(s)\n{table}")
    if args.kernels:
        args.kernels.write_text("\n\n".join(tables))
        print(f"\nkernel tables: {args.kernels}")


if __name__ == "__main__":
    main()
