"""Performance benchmark: entityseg's CropFormer next to Hugging Face's Mask2Former.

    python scripts/benchmark.py --backbone swin_tiny|swin_large --height H --width W
        --device cpu|cuda --threads T --precision fp32|bf16 --runs N --json OUT.json
        [--warmup 1] [--tasks forward end_to_end train_step dataloader [predict_memory]]
        [--views 1 5 9] [--high-res] [--onnx] [--experiment demo] [--overrides key=value ...]

Writes a JSON list of rows ``{"impl", "task", "mode", "views", "device", "precision", "height",
"width", "threads", "median_ms", "min_ms", "max_ms", "peak_mem_mb"}`` (plus a few descriptive
keys, e.g. ``params_m``) and prints them as a markdown table.

Models, random weights, nothing downloaded:
  * ``entityseg``: ``cfg.model.net`` composed from ``conf/train.yaml`` with
    ``model/backbone=<--backbone>`` (and ``experiment=<--experiment>``, ``--overrides``), with
    its 1 entity class and 100 queries;
  * ``hf_mask2former``: ``transformers.Mask2FormerForUniversalSegmentation`` from a
    ``Mask2FormerConfig`` that mirrors the entityseg net (Swin sizes of the backbone, hidden and
    mask dims, deformable-encoder layers, heads, FFN dims, queries, ``num_labels=1``; HF's
    ``decoder_layers`` counts the prediction on the learnable queries: ours + 1). Needs the
    ``bench`` extra (``pip install -e '.[bench]'``); without it the HF rows are skipped;
  * ``onnxruntime`` (``--onnx``; CPU, fp32): the entityseg net exported by
    ``entityseg.export.export_network`` (one ``image_o`` and one ``batch_oc`` file, opset 18,
    in a temp folder; the export's seconds are in the rows' ``export_s``) and run by
    :class:`~entityseg.inference.exported.OnnxNetwork` with ``--threads`` intra-op threads.
    Needs the ``export`` extra.

Tasks (``--tasks``; input ``[1, V, 3, H, W]`` random, zero-padded to a multiple of 32):
  * ``forward``: ``net(images)``; mode ``image_o`` (V = 1, ``batch_level=False``; the HF model
    runs this one too), ``batch_oc`` with V = 5 (I^O + fixed4 crops) and V = 9 (fixed8); with
    ``--onnx`` the exported file beside each (``image_o`` from the image-level file);
  * ``end_to_end``: the forward + ``fuse_entities`` at an original size of H x W (real
    ``crop_boxes``, delta 0.7) + RLE records (``Entities.to_coco``); with random weights the
    number of entities (and so the fusion/RLE cost) is whatever the untrained net gives;
  * ``train_step``: forward + ``cfg.model.criterion`` + backward, batch 2 of 2 views (I^O and
    one crop), 4 random rectangle entities per image (mode ``train``);
  * ``dataloader``: the training DataLoader of ``cfg.data`` (the synthetic set, generated into a
    temp folder) with its own workers/pin_memory/persistent_workers; one timed run is one epoch,
    reported per batch (ms per batch), height/width = the largest padded batch; ``peak_mem_mb``
    counts this process only, not the workers. A note compares its rate with the train step's;
  * ``predict_throughput``: images per second of ``predict`` over ``--photos`` synthetic photos
    of ``--height`` x ``--width`` (the network above in a checkpoint with ``cfg.data``'s test
    views): ``path=sequential``, the loop ``predict`` ran before it ran on Lightning (decode,
    ``EntitySegmenter``, pictures, a synced json line, one image after another, in this
    process), against ``path=lightning``, ``python -m entityseg.predict`` in a new process
    with 0 and 2 loader workers (``--threads`` torch threads), and with ``trainer=ddp_cpu``
    (two processes; Lightning gives each cores / 2 threads); ``--predict-workers``,
    ``--predict-batch`` and ``--predict-processes`` change them (a GPU: ``--predict-workers 8
    --predict-batch 4 --predict-processes 1``). The Lightning rows take the
    run's own summary: images over the time since its predict loop began (process start-up
    and the model's loading excluded, as they are for the sequential loop) and the peak
    memory of rank 0's whole process (resident, or GPU memory on CUDA); the sequential row's
    ``peak_mem_mb`` is its loop's, over what the benchmark held before (as the other tasks').
    ``median_ms`` is ms per image; one run each;
  * ``predict_memory`` (or ``--high-res``): what ``python -m entityseg.predict`` does for one
    6000 x 4000 photo (``--high-res-size``): ``prediction_views`` at the test size of
    ``cfg.data`` at ``size_scale`` 1 (shortest edge 800, longest at most 1333), fixed8 crops
    (V = 9), ``collate_views``, ``run_modes`` (``batch_oc``), RLE records; one run, no warm-up.

Timing: one process; for every run the implementations of a case take turns (entityseg, then
HF, then onnxruntime), so drift hits all; ``--warmup`` untimed runs first; median/min/max over
``--runs``. On CUDA the timed region is synchronised. Inference runs under
``torch.inference_mode()``; ``--precision bf16`` puts ``torch.autocast(device,
torch.bfloat16)`` around the forward (and the criterion), on the CPU too.

Memory, ``peak_mem_mb``: the increase over what the process held just before each timed run
(weights and inputs excluded), the largest over the runs. CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus ``memory_allocated`` before (GPU memory only), plus what the
first warm-up run left allocated (with ``inference.cuda_graphs=true``: the graph's memory pool,
held between runs). CPU: a thread
samples the current RSS (psutil, else /proc/self/statm) every ~5 ms during the run, minus the
RSS before it (after ``malloc_trim``); spikes shorter than the sampling period can be missed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from entityseg.data.crops import crop_boxes
from entityseg.data.synthetic import generate_dataset
from entityseg.data.views import ViewConfig, collate_views, prediction_views
from entityseg.inference.cuda_graphs import graphed
from entityseg.inference.fusion import fuse_entities
from entityseg.inference.runner import run_modes
from entityseg.inference.settings import InferenceSettings
from entityseg.models.checkpoint import NET_CONFIG_KEY, VIEWS_KEY

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = (
    "forward",
    "end_to_end",
    "train_step",
    "dataloader",
    "predict_memory",
    "predict_throughput",
)
DEFAULT_TASKS = ("forward", "end_to_end", "train_step", "dataloader")
MODE_OF_VIEWS = {1: "image_o", 5: "batch_oc", 9: "batch_oc"}
LAYOUT_OF_VIEWS = {5: "fixed4", 9: "fixed8"}
CROP_DELTA = 0.7
SIZE_DIVISIBILITY = 32
TRAIN_VIEWS, TRAIN_ENTITIES = 2, 4

#: Swin sizes of the timm backbones: embed dim, depths, heads, window (HF ``SwinConfig``).
SWIN_SIZES = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


# --- memory ----------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS baselines are low."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a region, in MB over what was held when it started.

    CUDA: allocator peak (``max_memory_allocated``). CPU: the current RSS sampled by a thread
    every ``interval`` seconds (``ru_maxrss`` is process-wide and never goes down).
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._max_rss = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max_rss = max(self._max_rss, current_rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self._base = self._max_rss = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max_rss, current_rss())
        self.peak_mb = max(0, peak - self._base) / 2**20


# --- cases and timing ------------------------------------------------------------------------


@dataclass
class Case:
    """One row: a callable run ``--runs`` times (after warm-up), with its description."""

    impl: str
    task: str
    mode: str
    views: int
    height: int
    width: int
    run: Callable[[], object]
    extra: dict = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    held_mb: float = 0.0  # CUDA: left allocated by the first warm-up run (graph pools)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(group: list[Case], runs: int, warmup: int, device: torch.device) -> None:
    """Warm-up, then ``runs`` rounds in which every case of the group runs once, in turn."""
    for step in range(warmup):
        for case in group:
            held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            case.run()
            synchronize(device)
            if step == 0 and device.type == "cuda":  # e.g. a captured CUDA graph's pool
                case.held_mb = max(0, torch.cuda.memory_allocated(device) - held) / 2**20
    for _ in range(runs):
        for case in group:
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                case.run()
                synchronize(device)
                case.times_ms.append((time.perf_counter() - start) * 1000)
            case.peak_mb = max(case.peak_mb, memory.peak_mb)


def row(case: Case, args: argparse.Namespace) -> dict:
    return {
        "impl": case.impl,
        "task": case.task,
        "mode": case.mode,
        "views": case.views,
        "device": args.device,
        "precision": args.precision,
        "height": case.height,
        "width": case.width,
        "threads": torch.get_num_threads(),
        "median_ms": statistics.median(case.times_ms),
        "min_ms": min(case.times_ms),
        "max_ms": max(case.times_ms),
        "peak_mem_mb": case.peak_mb + case.held_mb,
        **case.extra,
    }


# --- models and inputs -----------------------------------------------------------------------


def compose_config(args: argparse.Namespace) -> DictConfig:
    overrides = [f"model/backbone={args.backbone}", *args.overrides]
    if args.experiment:
        overrides.insert(0, f"experiment={args.experiment}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def parameters_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def hf_mask2former_config(cfg: DictConfig):
    """A ``Mask2FormerConfig`` of the same sizes as ``cfg.model.net``; None if not a Swin."""
    from transformers import Mask2FormerConfig, SwinConfig

    name = cfg.model.backbone.name
    if name not in SWIN_SIZES:
        return None
    embed_dim, depths, heads, window = SWIN_SIZES[name]
    net = cfg.model.net
    pixel, decoder = net.pixel_decoder, net.decoder
    if pixel.num_heads != decoder.num_heads:
        print(
            f"note: HF Mask2Former has one num_attention_heads; using the decoder's "
            f"{decoder.num_heads} (our pixel decoder has {pixel.num_heads})"
        )
    swin = SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(heads),
        window_size=window,
        drop_path_rate=float(cfg.model.backbone.get("drop_path_rate", 0.0)),
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=swin,
        use_pretrained_backbone=False,
        num_labels=1,
        num_queries=int(decoder.num_queries),
        hidden_dim=int(decoder.hidden_dim),
        feature_size=int(pixel.conv_dim),
        mask_feature_size=int(pixel.mask_dim),
        encoder_layers=int(pixel.num_layers),
        encoder_feedforward_dim=int(pixel.ffn_dim),
        decoder_layers=int(decoder.num_layers) + 1,  # HF counts the query-only prediction
        num_attention_heads=int(decoder.num_heads),
        dim_feedforward=int(decoder.ffn_dim),
        pre_norm=bool(decoder.pre_norm),
    )


def build_hf_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module | None:
    """HF's Mask2Former with random weights, or None (with a note) when it cannot be built."""
    try:
        from transformers import Mask2FormerForUniversalSegmentation
    except ImportError:
        print(
            "note: transformers is not installed; skipping the hf_mask2former rows "
            "(pip install -e '.[bench]')"
        )
        return None
    config = hf_mask2former_config(cfg)
    if config is None:
        print(f"note: {cfg.model.backbone.name} is not a Swin; skipping the hf_mask2former rows")
        return None
    return Mask2FormerForUniversalSegmentation(config).eval().to(device)


def padded(size: int) -> int:
    return -(-size // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def random_views(views: int, height: int, width: int, device: torch.device, batch: int = 1):
    """Normalised-looking random views ``[batch, V, 3, H', W']``, zero-padded to 32."""
    images = torch.zeros(batch, views, 3, padded(height), padded(width), device=device)
    images[..., :height, :width] = torch.randn(batch, views, 3, height, width, device=device)
    return images


def view_boxes(views: int, height: int, width: int) -> torch.Tensor:
    """crop_boxes float[1, V, 4]: the whole image, then the fixed4/fixed8 crops (delta 0.7)."""
    boxes = [(0, 0, width, height)]
    if views > 1:
        boxes += crop_boxes(height, width, LAYOUT_OF_VIEWS[views], CROP_DELTA)
    return torch.tensor([boxes], dtype=torch.float32)


def random_targets(
    batch: int, views: int, height: int, width: int, generator: torch.Generator
) -> list[list[dict]]:
    """targets[n][v] = {"masks": bool[M, H, W], "ids": long[M]}: random rectangles per view."""
    targets = []
    for _ in range(batch):
        per_view = []
        for _ in range(views):
            masks = torch.zeros(TRAIN_ENTITIES, height, width, dtype=torch.bool)
            for m in range(TRAIN_ENTITIES):
                y0 = int(torch.randint(0, height // 2, (1,), generator=generator))
                x0 = int(torch.randint(0, width // 2, (1,), generator=generator))
                h = int(torch.randint(4, height // 2 + 5, (1,), generator=generator))
                w = int(torch.randint(4, width // 2 + 5, (1,), generator=generator))
                masks[m, y0 : y0 + h, x0 : x0 + w] = True
            per_view.append({"masks": masks, "ids": torch.arange(TRAIN_ENTITIES)})
        targets.append(per_view)
    return targets


# --- the tasks -------------------------------------------------------------------------------


class Bench:
    """Builds the cases of every task from the composed config and the command line."""

    def __init__(self, args: argparse.Namespace, cfg: DictConfig, device: torch.device) -> None:
        self.args, self.cfg, self.device = args, cfg, device
        self.net = instantiate(cfg.model.net).eval().to(device)
        compiled = bool(cfg.model.get("compile"))
        if compiled:  # model.compile=true: as training, evaluate and predict do
            self.net.compile_parts()
        # inference.cuda_graphs=true: replayed graphs, as evaluate and predict run them
        self.forward = graphed(self.net, bool(cfg.inference.get("cuda_graphs")), device)
        self.hf = build_hf_model(cfg, device) if args.hf else None
        self.extra = {
            "backbone": args.backbone,
            "params_m": round(parameters_m(self.net), 2),
            "compile": compiled,
            "cuda_graphs": self.forward is not self.net,
        }
        self.hf_extra = {"backbone": args.backbone}
        if self.hf is not None:
            self.hf_extra["params_m"] = round(parameters_m(self.hf), 2)
        self._onnx_dir = tempfile.TemporaryDirectory(prefix="entityseg_onnx_")
        self.onnx: dict[str, object] = {}  # mode -> OnnxNetwork (--onnx)
        self.onnx_extra = {"backbone": args.backbone, "params_m": self.extra["params_m"]}
        if args.onnx and "forward" in args.tasks:
            modes = sorted({MODE_OF_VIEWS[v] for v in args.views})
            self.onnx = self.onnx_networks(modes, Path(self._onnx_dir.name))

    def onnx_networks(self, modes: list[str], folder: Path) -> dict[str, object]:
        """The net exported to ONNX once per mode and loaded into onnxruntime (``--onnx``)."""
        from entityseg.export import OPSET, export_network
        from entityseg.inference.exported import OnnxNetwork

        views = ViewConfig.from_keys(self.cfg.data, others="ignore")
        networks = {}
        for mode in modes:
            path = folder / f"{mode}.onnx"
            start = time.perf_counter()
            export_network(self.net, path, "onnx", mode, views, "entityseg")
            seconds = time.perf_counter() - start
            print(f"note: exported the {mode} network to ONNX in {seconds:.0f} s")
            self.onnx_extra[f"export_s_{mode}"] = round(seconds, 1)
            networks[mode] = OnnxNetwork(path, threads=torch.get_num_threads())
        self.onnx_extra["opset"] = OPSET
        return networks

    def autocast(self):
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inference_groups(self, task: str) -> Iterator[list[Case]]:
        h, w = self.args.height, self.args.width
        settings = InferenceSettings.from_config(self.cfg.inference)
        # as evaluate and predict run the network
        view_chunk = settings.views_at_once(self.device)
        for views in self.args.views:
            mode = MODE_OF_VIEWS[views]
            images = random_views(views, h, w, self.device)
            boxes = view_boxes(views, h, w)
            sizes = torch.tensor([[h, w]])

            def forward(images=images, batch_level=views > 1):
                with torch.inference_mode(), self.autocast():
                    return self.forward(images, batch_level=batch_level, view_chunk=view_chunk)

            def end_to_end(forward=forward, boxes=boxes, sizes=sizes, mode=mode):
                outputs = forward()
                with torch.inference_mode():
                    entities = fuse_entities(
                        outputs,
                        boxes,
                        sizes,
                        sizes,
                        mode,
                        settings,
                    )
                    return [e.to_coco(image_id=1) for e in entities]

            run = forward if task == "forward" else end_to_end
            group = [Case("entityseg", task, mode, views, h, w, run, self.extra)]
            if task == "forward" and views == 1 and self.hf is not None:
                pixel_values = images[:, 0]

                def hf_forward(pixel_values=pixel_values):
                    with torch.inference_mode(), self.autocast():
                        return self.hf(pixel_values=pixel_values)

                group.append(Case("hf_mask2former", task, mode, 1, h, w, hf_forward, self.hf_extra))
            if task == "forward" and mode in self.onnx:

                def onnx_forward(images=images, batch_level=views > 1, net=self.onnx[mode]):
                    return net(images, batch_level=batch_level)

                extra = {**self.onnx_extra, "export_s": self.onnx_extra[f"export_s_{mode}"]}
                group.append(Case("onnxruntime", task, mode, views, h, w, onnx_forward, extra))
            yield group

    def train_step_case(self) -> Case:
        h, w = self.args.height, self.args.width
        criterion = instantiate(self.cfg.model.criterion).to(self.device)
        batch = self.args.train_batch
        images = random_views(TRAIN_VIEWS, h, w, self.device, batch=batch)
        generator = torch.Generator().manual_seed(0)
        targets = random_targets(batch, TRAIN_VIEWS, *images.shape[-2:], generator)
        targets = [[{k: v.to(self.device) for k, v in t.items()} for t in ts] for ts in targets]

        def step():
            self.net.train()
            with self.autocast():
                losses = criterion(self.net(images), targets)
            losses["loss"].backward()
            self.net.zero_grad(set_to_none=True)  # the gradients count in this step's peak
            self.net.eval()

        extra = {**self.extra, "batch_size": batch}
        return Case("entityseg", "train_step", "train", TRAIN_VIEWS, h, w, step, extra)

    @contextlib.contextmanager
    def dataloader_case(self) -> Iterator[Case]:
        """The training DataLoader of ``cfg.data`` over a synthetic set in a temp folder."""
        data = self.cfg.data
        syn = data.get("synthetic") or {}
        num_images = self.args.loader_images or int(syn.get("num_train", 16))
        height, width = self.args.loader_size or (
            int(syn.get("height", 768)),
            int(syn.get("width", 1024)),
        )
        with tempfile.TemporaryDirectory(prefix="entityseg_bench_") as tmp:
            counts = {k: int(syn[k]) for k in ("num_objects", "num_small") if k in syn}
            json_path = generate_dataset(
                Path(tmp) / "train",
                num_images,
                seed=int(syn.get("seed", 0)),
                height=height,
                width=width,
                **counts,
            )
            files = dict(train_json=str(json_path), train_images=str(json_path.parent / "images"))
            datamodule = instantiate(
                data,
                **files,
                val_json=files["train_json"],
                val_images=files["train_images"],
                synthetic=None,
            )
            datamodule.setup("fit")
            loader = datamodule.train_dataloader()
            batches = len(loader)
            if batches == 0:
                raise SystemExit(f"dataloader: {num_images} images give no full batch")
            largest = [0, 0]

            def epoch():
                for batch in loader:
                    largest[:] = np.maximum(largest, batch["images"].shape[-2:]).tolist()
                    if self.device.type == "cuda":
                        batch["images"].to(self.device, non_blocking=True)
                        for views in batch["targets"]:
                            for target in views:
                                target["masks"].to(self.device, non_blocking=True)

            extra = {
                "batch_size": loader.batch_size,
                "batches_per_epoch": batches,
                "num_workers": loader.num_workers,
                "pin_memory": loader.pin_memory,
                "persistent_workers": loader.persistent_workers,
                "dataset_images": f"{num_images} x {height}x{width}",
            }
            case = Case("entityseg", "dataloader", "train", TRAIN_VIEWS, 0, 0, epoch, extra)
            try:
                yield case
            finally:
                case.height, case.width = largest
                case.times_ms = [t / batches for t in case.times_ms]  # per batch
                case.run = lambda: None
                loader = datamodule = None  # stops the persistent workers
                gc.collect()

    def predict_throughput_cases(self) -> list[Case]:
        """``predict`` over the same photos: the sequential loop, then the Lightning path."""
        height, width = self.args.height, self.args.width
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        views = ViewConfig.from_keys(data, others="ignore")
        mode = self.cfg.inference.mode
        num_views = 1 + len(crop_boxes(height, width, views.crop_layout, views.crop_delta))
        cases = []
        with tempfile.TemporaryDirectory(prefix="entityseg_throughput_") as tmp:
            folder = Path(tmp)
            photos = (
                generate_dataset(
                    folder / "set", self.args.photos, seed=0, height=height, width=width
                ).parent
                / "images"
            )
            checkpoint = folder / "bench.ckpt"
            state = {f"net.{k}": v.cpu() for k, v in self.net.state_dict().items()}
            views_keys = ViewConfig.test_keys_of(data)
            net_config = OmegaConf.to_container(OmegaConf.create(dict(self.net.config)))
            torch.save(
                {"state_dict": state, NET_CONFIG_KEY: net_config, VIEWS_KEY: views_keys},
                checkpoint,
            )
            extra = {**self.extra, "images": self.args.photos}
            seconds, peak_mb = sequential_predict(
                checkpoint, photos, folder / "sequential", self.args
            )
            cases.append(
                throughput_case(mode, num_views, height, width, seconds, self.args.photos, extra)
            )
            cases[-1].peak_mb = peak_mb
            cases[-1].extra.update(path="sequential", processes=1, num_workers=0)
            variants = [(workers, 1) for workers in self.args.predict_workers]
            if self.args.predict_processes > 1:
                variants.append((self.args.predict_workers[0], self.args.predict_processes))
            for workers, processes in variants:
                run = lightning_predict(checkpoint, photos, folder, workers, processes, self.args)
                case = throughput_case(
                    mode, num_views, height, width, run["seconds"], run["images"], extra
                )
                case.peak_mb = run["peak_mb"]
                case.extra.update(path="lightning", processes=run["processes"], num_workers=workers)
                cases.append(case)
        return cases

    def predict_memory_case(self) -> Case:
        """``python -m entityseg.predict`` on one large photo: views, network, fusion, RLE."""
        height, width = self.args.high_res_size
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        data.update(test_crop_layout="fixed8", size_scale=1.0)
        views = ViewConfig.from_keys(data, others="ignore")
        # the network in the benchmark's precision, as predict runs it in inference.precision
        settings = InferenceSettings.from_config(self.cfg.inference, precision=self.args.precision)
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

        def predict():
            sample = prediction_views(image, views)
            sample.update(image_id=1, file_name="photo.jpg", num_skipped=0)
            batch = collate_views([sample])
            result = run_modes(
                self.net, [batch], ["batch_oc"], self.device, settings, show_progress=False
            )["batch_oc"]
            return result.entities[1].to_coco(1)

        extra = {
            **self.extra,
            "net_input": f"short side {views.short_sizes[0]}, max {views.max_size}",
        }
        return Case("entityseg", "predict_memory", "batch_oc", 9, height, width, predict, extra)


def throughput_case(
    mode: str, views: int, height: int, width: int, seconds: float, images: int, extra: dict
) -> Case:
    """A ``predict_throughput`` row: ms per image (one run), images per second."""
    case = Case("entityseg", "predict_throughput", mode, views, height, width, lambda: None)
    case.extra = {**extra, "images_per_s": round(images / seconds, 3)}
    case.times_ms = [seconds * 1000 / images]
    return case


def sequential_predict(checkpoint: Path, photos: Path, out: Path, args) -> tuple[float, float]:
    """Seconds of the loop ``predict`` ran before Lightning, over every photo of ``photos``
    (after one untimed image: the model loaded and warm, as the Lightning rows' are), and its
    peak memory (:class:`PeakMemory`: over what this process held before the loop)."""
    from entityseg.api import EntitySegmenter
    from entityseg.data.coco_entity import read_rgb_image
    from entityseg.data.views import segmentable
    from entityseg.inference.writing import prediction_records, write_pictures

    segmenter = EntitySegmenter.from_checkpoint(
        checkpoint, device=args.device, precision=args.precision
    )
    paths = sorted(photos.iterdir())
    segmenter(paths[0])
    out.mkdir(parents=True)
    start = time.perf_counter()
    with PeakMemory(torch.device(args.device)) as memory, open(out / "lines.jsonl", "ab") as lines:
        for number, path in enumerate(paths, start=1):
            image = segmentable(read_rgb_image(path), path)
            entities = segmenter(image)
            write_pictures(image, entities, out, path.stem)
            records = prediction_records(entities, number, path.name)
            lines.write(json.dumps({"file_name": path.name, "predictions": records}).encode())
            lines.write(b"\n")
            lines.flush()
            os.fsync(lines.fileno())
    return time.perf_counter() - start, memory.peak_mb


#: predict's summary line: this run's images, seconds, processes, and rank 0's peak memory
SUMMARY = re.compile(
    r"this run: (?P<images>\d+) images in (?P<seconds>[\d.]+) s \([\d.]+ images/s, "
    r"(?P<processes>\d+) process\(es\)\); peak (?P<peak_mb>\d+) MB"
)


def lightning_predict(
    checkpoint: Path, photos: Path, folder: Path, workers: int, processes: int, args
) -> dict:
    """``python -m entityseg.predict`` over ``photos`` with ``processes`` processes (DDP on
    ``args.device``; one: a plain run with ``--threads`` threads): its summary."""
    name = f"lightning_w{workers}_p{processes}"
    command = [
        sys.executable,
        "-m",
        "entityseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        f"output={folder / name}",
        f"hydra.run.dir={folder / name}_hydra",
        f"data.num_workers={workers}",
        f"inference.precision={args.precision}",
        f"inference.batch_size={args.predict_batch}",
    ]
    env = dict(os.environ)
    if processes > 1:
        trainer = "ddp_cpu" if args.device == "cpu" else "ddp"
        command += [f"trainer={trainer}", f"trainer.devices={processes}"]
    else:
        command.append(f"inference.device={args.device}")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    match = SUMMARY.search(result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"predict_throughput: {name} failed:\n{result.stderr[-3000:]}")
    return {
        "images": int(match["images"]),
        "seconds": float(match["seconds"]),
        "processes": int(match["processes"]),
        "peak_mb": float(match["peak_mb"]),
    }


# --- report ----------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| impl | task | mode | V | size | device | precision | threads | median ms "
        "| min-max ms | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tags = [
            tag
            for key, tag in (("compile", "compiled"), ("cuda_graphs", "CUDA graphs"))
            if r.get(key)
        ]
        impl = r["impl"] + "".join(f" ({tag})" for tag in tags)
        lines.append(
            f"| {impl} | {r['task']} | {r['mode']} | {r['views']} | "
            f"{r['height']}x{r['width']} | {r['device']} | {r['precision']} | {r['threads']} | "
            f"{r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
            f"{r['peak_mem_mb']:.0f} |"
        )
    return "\n".join(lines)


def loader_note(rows: list[dict]) -> str | None:
    """Whether data loading keeps up with training: loader rate / train-step rate."""
    loader = next((r for r in rows if r["task"] == "dataloader"), None)
    step = next((r for r in rows if r["task"] == "train_step"), None)
    if loader is None or step is None:
        return None
    ratio = step["median_ms"] / loader["median_ms"]
    verdict = "keeps up" if ratio >= 2 else "does NOT keep up"
    return (
        f"data loading: {loader['median_ms']:.1f} ms/batch ({1000 / loader['median_ms']:.2f} "
        f"batches/s; batch {loader['batch_size']}, {loader['num_workers']} workers, "
        f"pin_memory={loader['pin_memory']}, persistent_workers={loader['persistent_workers']}, "
        f"batches up to {loader['height']}x{loader['width']}) vs train step "
        f"{step['median_ms']:.1f} ms (batch {step['batch_size']} at "
        f"{step['height']}x{step['width']}): loader rate = {ratio:.1f}x the train-step rate "
        f"({verdict} with the >= 2x target; compare at the same input size)"
    )


def throughput_note(rows: list[dict]) -> str | None:
    """predict's images per second, the Lightning paths beside the sequential loop."""
    found = [r for r in rows if r["task"] == "predict_throughput"]
    if not found:
        return None
    base = next(r for r in found if r["path"] == "sequential")["images_per_s"]
    parts = [
        f"{r['path']} ({r['processes']} process(es), {r['num_workers']} workers): "
        f"{r['images_per_s']:.2f} images/s ({r['images_per_s'] / base:.2f}x)"
        for r in found
    ]
    return "predict throughput: " + "; ".join(parts)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    backbones = sorted(p.stem for p in (CONF / "model" / "backbone").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=backbones, default="swin_tiny")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS), metavar="TASK"
    )
    parser.add_argument(
        "--views",
        type=int,
        nargs="+",
        choices=sorted(MODE_OF_VIEWS),
        default=sorted(MODE_OF_VIEWS),
        help="1: image_o; 5: batch_oc with fixed4 crops; 9: batch_oc with fixed8 crops",
    )
    parser.add_argument("--high-res", action="store_true", help="add the predict_memory task")
    parser.add_argument(
        "--high-res-size",
        type=int,
        nargs=2,
        default=(4000, 6000),
        metavar=("H", "W"),
        help="the photo of predict_memory",
    )
    parser.add_argument("--train-batch", type=int, default=2, help="train_step: images")
    parser.add_argument("--photos", type=int, default=16, help="predict_throughput: photos")
    parser.add_argument(
        "--predict-workers",
        type=int,
        nargs="+",
        default=[0, 2],
        help="predict_throughput: one Lightning row per loader-worker count",
    )
    parser.add_argument(
        "--predict-batch", type=int, default=1, help="predict_throughput: inference.batch_size"
    )
    parser.add_argument(
        "--predict-processes",
        type=int,
        default=2,
        help="predict_throughput: a row with this many processes (DDP; 1: none)",
    )
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip HF Mask2Former")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="forward: add onnxruntime rows (CPU, fp32; exports the net first: minutes for Swin)",
    )
    parser.add_argument("--experiment", default=None, help="compose experiment=<this> too")
    parser.add_argument(
        "--loader-images", type=int, default=None, help="dataloader: images (data config's)"
    )
    parser.add_argument(
        "--loader-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="dataloader"
    )
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (key=value)")
    args = parser.parse_args(argv)
    if args.high_res and "predict_memory" not in args.tasks:
        args.tasks.append("predict_memory")
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    if min(args.height, args.width) < 32:
        parser.error("--height and --width must be at least 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.onnx and (args.device, args.precision) != ("cpu", "fp32"):
        parser.error("--onnx: onnxruntime rows run on the CPU in fp32 (--device cpu)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    bench = Bench(args, compose_config(args), device)

    cases = []
    # first: RSS is the CPU measure, and after a training step the process's heap is
    # fragmented (the same predict then shows twice its own peak)
    if "predict_memory" in args.tasks:
        case = bench.predict_memory_case()
        measure([case], runs=1, warmup=0, device=device)
        cases.append(case)
    for task in ("forward", "end_to_end"):
        if task in args.tasks:
            for group in bench.inference_groups(task):
                measure(group, args.runs, args.warmup, device)
                cases += group
    if "predict_throughput" in args.tasks:
        cases += bench.predict_throughput_cases()
    if "train_step" in args.tasks:
        case = bench.train_step_case()
        measure([case], args.runs, args.warmup, device)
        cases.append(case)
    if "dataloader" in args.tasks:
        with bench.dataloader_case() as case:
            measure([case], args.runs, args.warmup, device)
        cases.append(case)

    rows = [row(case, args) for case in cases]
    print(markdown_table(rows))
    params = f"entityseg {bench.extra['params_m']} M"
    if "params_m" in bench.hf_extra:
        params += f", hf_mask2former {bench.hf_extra['params_m']} M"
    print(f"\nparameters ({args.backbone}): {params}")
    for note in (loader_note(rows), throughput_note(rows)):
        if note:
            print(f"\n{note}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
