"""Time the deformable-attention core: PyTorch reference vs the fused Triton kernel (CUDA).

    python scripts/bench_ms_deform_attn.py [--runs 20] [--batch 2] [--heads 8] [--head-dim 32]
        [--points 4] [--shapes 100x152 50x76 25x38] [--dtypes fp32 bf16] [--json OUT]

The defaults are the release's pixel-decoder encoder at 800 x 1216 (strides 8/16/32, every
token a query). Each pass is timed ``--runs`` times after warm-up, synchronising CUDA around
each run; the table gives the median in ms, the speed-up and the peak memory of the pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from entityseg.models.ms_deform_attn import ms_deform_attn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(shapes, batch, heads, head_dim, points, dtype, device="cuda"):
    """Encoder-like inputs: every token a query, points a few pixels around it."""
    gen = torch.Generator(device).manual_seed(0)
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    starts = torch.cat((spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]))
    tokens, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, device=device, generator=gen)
    centres = torch.rand(batch, tokens, 1, 1, 1, 2, device=device, generator=gen)
    offsets = torch.randn(batch, tokens, heads, levels, points, 2, device=device, generator=gen)
    size_xy = spatial.flip(-1).float()[None, None, None, :, None, :]  # [1, 1, 1, L, 1, 2]
    locations = centres + 2.0 * offsets / size_xy  # [B, Lq, heads, L, P, 2]
    logits = torch.randn(batch, tokens, heads, levels * points, device=device, generator=gen)
    weights = logits.softmax(-1).view(batch, tokens, heads, levels, points)
    return [t.to(dtype) for t in (value, locations, weights)], spatial, starts


def time_pass(fn, runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of ``fn()`` over ``runs`` and the peak memory (MiB) it allocated."""
    for _ in range(warmup):  # compilation, autotuning caches, allocator
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def time_op(op, inputs: list[torch.Tensor], runs: int) -> dict[str, tuple[float, float]]:
    """``{pass: (median ms, peak MiB)}`` of ``op(value, locations, weights)``."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward():
        with torch.no_grad():
            op(*inputs)

    def forward_backward():
        out = op(*leaves)
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None

    return {
        "forward": time_pass(forward, runs),
        "forward+backward": time_pass(forward_backward, runs),
    }


def bench(args) -> list[dict]:
    from entityseg.models.ops.ms_deform_attn_triton import ms_deform_attn_triton

    rows = []
    for dtype_name in args.dtypes:
        inputs, spatial, starts = make_inputs(
            args.shapes, args.batch, args.heads, args.head_dim, args.points, DTYPES[dtype_name]
        )
        ops = {
            "torch": partial(_reference, spatial=spatial),
            "triton": partial(_fused, ms_deform_attn_triton, spatial=spatial, starts=starts),
        }
        for impl, op in ops.items():
            for name, (ms, peak) in time_op(op, inputs, args.runs).items():
                rows.append(
                    {
                        "dtype": dtype_name,
                        "pass": name,
                        "impl": impl,
                        "median_ms": round(ms, 4),
                        "peak_mib": round(peak, 1),
                        "runs": args.runs,
                        "batch": args.batch,
                        "shapes": args.shapes,
                        "heads": args.heads,
                        "head_dim": args.head_dim,
                        "points": args.points,
                        "device": torch.cuda.get_device_name(),
                    }
                )
    return rows


def _reference(value, locations, weights, spatial):
    return ms_deform_attn(value, spatial, locations, weights)


def _fused(op, value, locations, weights, spatial, starts):
    return op(value, spatial, starts, locations, weights)


def markdown(rows: list[dict]) -> str:
    by_key = {(r["dtype"], r["pass"], r["impl"]): r for r in rows}
    lines = [
        "| dtype | pass | torch ms | triton ms | speed-up | torch MiB | triton MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dtype, pass_ in dict.fromkeys((r["dtype"], r["pass"]) for r in rows):
        ref, fused = by_key[dtype, pass_, "torch"], by_key[dtype, pass_, "triton"]
        lines.append(
            f"| {dtype} | {pass_} | {ref['median_ms']:.3f} | {fused['median_ms']:.3f} | "
            f"{ref['median_ms'] / fused['median_ms']:.1f}x | {ref['peak_mib']:.0f} | "
            f"{fused['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[(100, 152), (50, 76), (25, 38)]
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ms_deform_attn: needs a CUDA GPU (torch.cuda.is_available() is False)")

    rows = bench(args)
    print(f"{torch.cuda.get_device_name()}, B={args.batch}, levels {args.shapes}, ", end="")
    print(f"heads {args.heads} x C {args.head_dim}, P {args.points}, median of {args.runs}\n")
    print(markdown(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
