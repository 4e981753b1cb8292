"""Export a checkpoint's network to ONNX or ``torch.export``, to run without entityseg's model
code, or as a model folder to share (``format=pretrained``).

``python -m entityseg.export ckpt_path=... [format=onnx|torch_export] [mode=image_o|batch_oc]
[output=model.onnx]`` writes the network from one image's normalised views to per-view entity
logits and masks (:mod:`entityseg.inference.exported` names the inputs, outputs and shapes;
H, W and V are dynamic), and in the file the test views, the mode, whether it has the batch
decoder, the fusion's default ``compat`` and the opset. Making the views, the fusion,
upsampling to the original size and RLE stay in the library
(:class:`~entityseg.inference.exported.OnnxNetwork` + ``inference.runner``).

``format=pretrained`` writes the folder of
:meth:`~entityseg.api.EntitySegmenter.save_pretrained` (``model.safetensors``, ``config.json``
and the model card, from the checkpoint's run when it has one) for
``EntitySegmenter.from_pretrained`` and ``push_to_hub``.

ONNX: opset :data:`OPSET` (18, IR version 10: onnxruntime >= 1.20), standard ops only: the
deformable attention of the pixel decoder is exported as its pure-PyTorch ``grid_sample`` form
(ONNX ``GridSample``, opset >= 16), never the Triton kernel or a custom op.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig
from torch import nn

from entityseg.api import segmenter_from_config
from entityseg.config import CONFIG_DIR, ConfigError, exits_on_config_error
from entityseg.data.views import SIZE_DIVISIBILITY, ViewConfig
from entityseg.inference.exported import (
    BATCH_OUTPUTS,
    EXPORT_MODES,
    IMAGE_OUTPUTS,
    INPUT_NAME,
    PT2_METADATA_FILE,
    ExportedNetwork,
    ExportInfo,
    OnnxNetwork,
    require,
)
from entityseg.models.hornet import GlobalLocalFilter
from entityseg.models.ms_deform_attn import MSDeformAttn

log = logging.getLogger(__name__)

#: ``format``: an ONNX file (onnxruntime), a ``torch.export`` program (``.pt2``), or a model
#: folder (safetensors, config, model card).
EXPORT_FORMATS = ("onnx", "torch_export", "pretrained")
SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2", "pretrained": ""}
#: The ONNX opset of exported files (GridSample needs >= 16; the dynamo exporter's own is 18).
OPSET = 18
#: Views of the example input: any V >= 2 keeps V dynamic (torch.export specialises a
#: dimension that is 1 in the example); the file then runs any V >= 1.
EXAMPLE_VIEWS = {"image_o": 2, "batch_oc": 3}
#: Largest H and W (pixels) and V the exported graph declares it accepts.
MAX_SIZE = 32 * 1024
MAX_VIEWS = 1024


class ViewsNetwork(nn.Module):
    """The exported function: one image's views ``[V, 3, H, W]`` -> per-view logits and masks.

    Returns ``image_logits [V, Q, 2]``, ``image_masks [V, Q, H/4, W/4]`` and, with
    ``batch_level``, ``batch_logits [V, Q, 2]``, ``batch_masks [V, Q, H/4, W/4]``: the final
    predictions of ``CropFormer.forward`` for a batch of one image, in the order of
    ``CropFormerOutput.to_tuple`` (:data:`IMAGE_OUTPUTS`, then :data:`BATCH_OUTPUTS`).
    """

    def __init__(self, net: nn.Module, batch_level: bool) -> None:
        super().__init__()
        self.net = net
        self.batch_level = batch_level

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.net(views[None], batch_level=self.batch_level)
        return tuple(tensor[0] for tensor in outputs.to_tuple())


def check_onnx_exportable(net: nn.Module) -> None:
    """Raise :class:`ConfigError` for a network that torch's ONNX exporter cannot translate:
    HorNet's global filter (complex-valued FFT). ``format=torch_export`` exports it."""
    if any(isinstance(m, GlobalLocalFilter) for m in net.modules()):
        raise ConfigError(
            "format",
            "onnx",
            "HorNet's global filter computes a complex FFT, which torch's ONNX exporter cannot "
            "translate: use format=torch_export",
        )


def check_export_settings(export_format: str, mode: str, has_batch_decoder: bool) -> None:
    """Raise :class:`ConfigError` on an unknown format or mode, or batch_oc without a batch
    decoder (a Mask2Former checkpoint)."""
    if export_format not in EXPORT_FORMATS:
        raise ConfigError("format", export_format, f"unknown; expected one of {EXPORT_FORMATS}")
    if mode not in EXPORT_MODES:
        raise ConfigError("mode", mode, f"unknown; expected one of {EXPORT_MODES}")
    if mode == "batch_oc" and not has_batch_decoder:
        raise ConfigError(
            "mode", mode, "needs the batch decoder, which this (Mask2Former) network has not"
        )


@contextlib.contextmanager
def pure_pytorch_deform_attn(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` with every deformable attention on the PyTorch op (never the Triton kernel):
    under export it is ``grid_sample``, standard ONNX ops. The settings come back after."""
    modules = [m for m in net.modules() if isinstance(m, MSDeformAttn)]
    impls = [m.impl for m in modules]
    for module in modules:
        module.impl = "torch"
    try:
        yield net
    finally:
        for module, impl in zip(modules, impls, strict=True):
            module.impl = impl


def example_views(mode: str, height: int, width: int) -> torch.Tensor:
    """The example input ``[V, 3, H, W]`` of the export (random, H and W multiples of 32)."""
    if min(height, width) < 1 or height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY:
        raise ConfigError(
            "example_size", [height, width], f"H and W must be multiples of {SIZE_DIVISIBILITY}"
        )
    generator = torch.Generator().manual_seed(0)
    return torch.randn(EXAMPLE_VIEWS[mode], 3, height, width, generator=generator)


def dynamic_shapes() -> dict:
    """``torch.export`` dims of the input ``[V, 3, H, W]``: V, and H and W any multiple of 32."""
    limit = MAX_SIZE // SIZE_DIVISIBILITY
    views = torch.export.Dim("views", min=1, max=MAX_VIEWS)
    height = SIZE_DIVISIBILITY * torch.export.Dim("height_32", min=1, max=limit)
    width = SIZE_DIVISIBILITY * torch.export.Dim("width_32", min=1, max=limit)
    return {INPUT_NAME: {0: views, 2: height, 3: width}}


@contextlib.contextmanager
def _general_shapes() -> Iterator[None]:
    """Trace without specialising to the example's sizes.

    ``backed_size_oblivious``: where the shape reasoning asks whether a size is 1 (reshapes,
    contiguity; Swin's window counts) it takes the general answer instead of guarding on the
    example's, so the graph is the one for every size, e.g. a stage with a single window.
    """
    with fx_config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers (the ONNX optimiser logs every pass it makes and warns
    about each op it leaves as it is)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_program(
    net: nn.Module, mode: str, example: torch.Tensor
) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`ViewsNetwork` with dynamic V, H and W."""
    # eval mode (the wrapper's and so the net's): only the final masks, no deep supervision
    module = ViewsNetwork(net, mode == "batch_oc").eval()
    with pure_pytorch_deform_attn(net), _general_shapes(), torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes())


def save_onnx(program: torch.export.ExportedProgram, path: Path, info: ExportInfo) -> None:
    """The ONNX file of an exported program, with ``info`` in its ``metadata_props``.

    The dynamo exporter (``torch.onnx.export(dynamo=True)``, through ``torch.export``) and not
    the TorchScript one: the tracer records every size computed in Python (position encodings,
    the deformable attention's level sizes, Swin's window counts) as a constant, so its graph
    would only run at the example's size; ``torch.export`` carries them as symbolic sizes.
    """
    require("onnxscript")
    require("onnx")
    outputs = IMAGE_OUTPUTS + (BATCH_OUTPUTS if info.has_batch_decoder else ())
    with _general_shapes(), _quiet("onnxscript", "onnx_ir"):
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            verbose=False,
        )
    onnx_program.model.metadata_props.update(info.to_metadata())
    onnx_program.save(str(path), external_data=False)


def save_torch_program(program: torch.export.ExportedProgram, path: Path, info: ExportInfo) -> None:
    """The ``.pt2`` of an exported program, ``info`` as its extra file ``entityseg.json``."""
    metadata = json.dumps(info.to_metadata())
    torch.export.save(program, path, extra_files={PT2_METADATA_FILE: metadata})


def export_network(
    net: nn.Module,
    path: str | Path,
    export_format: str,
    mode: str,
    views: ViewConfig,
    compat: str,
    example_size: tuple[int, int] = (256, 320),
) -> ExportInfo:
    """Export ``net`` (a ``CropFormer``, on the CPU) to ``path``; returns what the file stores.

    ``views`` and ``compat``: how the file's inputs are made and fused (stored in it).
    ``example_size``: the traced example's H x W (multiples of 32); the file runs at any.
    """
    check_export_settings(export_format, mode, net.has_batch_decoder)
    if export_format == "onnx":
        check_onnx_exportable(net)
    info = ExportInfo(
        views=views,
        mode=mode,
        has_batch_decoder=mode == "batch_oc",
        compat=compat,
        opset=OPSET if export_format == "onnx" else None,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(net, mode, example_views(mode, *example_size))
    if export_format == "onnx":
        save_onnx(program, path, info)
    else:
        save_torch_program(program, path, info)
    return info


def load_exported(path: str | Path) -> OnnxNetwork | ExportedNetwork:
    """The exported network of ``path`` (``.onnx``: onnxruntime; else a ``.pt2``)."""
    return OnnxNetwork(path) if Path(path).suffix == ".onnx" else ExportedNetwork(path)


def largest_difference(
    net: nn.Module, exported: OnnxNetwork | ExportedNetwork, images: torch.Tensor
) -> dict[str, float]:
    """Max |exported - PyTorch| of each final output on ``images [N, V, 3, H, W]``."""
    batch_level = exported.has_batch_decoder
    with torch.inference_mode():
        expected = net(images, batch_level=batch_level)
    actual = exported(images, batch_level=batch_level)
    return {
        name: float((ours - theirs).abs().max())
        for name, ours, theirs in zip(
            IMAGE_OUTPUTS + BATCH_OUTPUTS, actual.to_tuple(), expected.to_tuple(), strict=False
        )
    }


def checkpoint_network(cfg: DictConfig) -> tuple[nn.Module, ViewConfig, str]:
    """The network of ``cfg.ckpt_path`` (CPU, eval), its test views and its compat.

    As ``predict`` and ``evaluate`` resolve them: the views the checkpoint stores (a training
    run's, or a converted release checkpoint's), ``data.*`` test keys given on the command line
    on top; ``inference.compat: null`` is the checkpoint's (``release`` for a converted one).
    """
    cfg.inference.device = "cpu"
    cfg.model.compile = False  # the export traces the plain modules
    segmenter = segmenter_from_config(cfg)
    return segmenter.net.cpu().eval(), segmenter.views, segmenter.settings.compat


def output_path(cfg: DictConfig) -> Path:
    """``output``, or ``<output folder>/<checkpoint name>_<mode>.onnx|.pt2`` (a model folder:
    ``<output folder>/<checkpoint name>``)."""
    if cfg.output is not None:
        return Path(cfg.output)
    if cfg.format == "pretrained":
        return Path(cfg.paths.output_dir) / Path(cfg.ckpt_path).stem
    name = f"{Path(cfg.ckpt_path).stem}_{cfg.mode}{SUFFIXES[cfg.format]}"
    return Path(cfg.paths.output_dir) / name


def export_pretrained(cfg: DictConfig) -> Path:
    """``format=pretrained``: the checkpoint's segmenter as a model folder; a folder that is
    the checkpoint itself is refused (never written over an input)."""
    cfg.inference.device = "cpu"
    cfg.model.compile = False
    path = output_path(cfg)
    if Path(cfg.ckpt_path).exists() and path.resolve() == Path(cfg.ckpt_path).resolve():
        raise ConfigError("output", str(path), "is the checkpoint itself: choose another folder")
    segmenter = segmenter_from_config(cfg)
    segmenter.save_pretrained(path)
    log.info("wrote %s: model.safetensors, config.json, README.md", path)
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@exits_on_config_error
def main(cfg: DictConfig) -> str:
    check_export_settings(cfg.format, cfg.mode, has_batch_decoder=True)
    if cfg.format == "pretrained":
        return str(export_pretrained(cfg))
    if cfg.format == "onnx":  # before minutes of tracing
        try:
            for module in ("onnx", "onnxscript", *(("onnxruntime",) if cfg.check else ())):
                require(module)
        except ImportError as err:
            raise SystemExit(str(err)) from None
    if len(cfg.example_size) != 2:
        raise ConfigError("example_size", list(cfg.example_size), "must be [H, W]")
    height, width = cfg.example_size
    example_views(cfg.mode, height, width)  # checked before the checkpoint is read
    net, views, compat = checkpoint_network(cfg)
    path = output_path(cfg)
    log.info("exporting %s (%s, mode %s) to %s", cfg.ckpt_path, cfg.format, cfg.mode, path)
    info = export_network(net, path, cfg.format, cfg.mode, views, compat, (height, width))
    log.info("wrote %s: %s", path, info)
    if cfg.check:
        size = (height + SIZE_DIVISIBILITY, width + 2 * SIZE_DIVISIBILITY)
        example = example_views(cfg.mode, *size)[None]  # [1, V, 3, H, W]
        differences = largest_difference(net, load_exported(path), example)
        log.info(
            "exported vs PyTorch on random views at %dx%d (not the example's size), max "
            "|difference|: %s (float rounding; where a mask logit sits at the masked-attention "
            "threshold, a flipped token can move one view's outputs by ~1e-3)",
            *size,
            ", ".join(f"{k} {v:.2g}" for k, v in differences.items()),
        )
    return str(path)


if __name__ == "__main__":
    main()
