"""Run an exported network (``python -m entityseg.export``) as the PyTorch one runs.

An exported file holds the network from one image's normalised views to per-view entity
logits and masks, and what is needed to use it without the checkpoint (:class:`ExportInfo`).
:class:`OnnxNetwork` (onnxruntime, CPU) and :class:`ExportedNetwork` (a ``torch.export``
``.pt2``) take ``CropFormer.forward``'s arguments and return its output structure, so
``inference.runner.infer_batch`` / ``run_modes`` fuse their outputs exactly as the PyTorch
network's (one fusion path)::

    net = OnnxNetwork("cropformer.onnx")
    sample = prediction_views(rgb_image, net.views)
    sample.update(image_id=0, file_name="", num_skipped=0)
    entities, _ = infer_batch(net, collate_views([sample]), ["batch_oc"], torch.device("cpu"),
                              compat=net.compat)

The graph (input and output names, shapes; H and W dynamic, multiples of 32):
  * input ``views`` float32 ``[V, 3, H, W]``: view 0 the full image I^O, views 1.. its crops
    I^C, normalised and zero-padded (bottom, right) to one size as
    ``data.views.prediction_views`` + ``collate_views`` make them. V is dynamic (any layout's
    crops, ``grid`` included; Image-O runs on the full view alone, V = 1);
  * ``image_logits [V, Q, 2]``, ``image_masks [V, Q, H/4, W/4]``: the image-level decoder,
    every view on its own;
  * ``batch_oc`` files (``mode=batch_oc``, all four Table 7 modes) also ``batch_logits
    [V, Q, 2]`` (one score per batch query, repeated in every view) and ``batch_masks
    [V, Q, H/4, W/4]``: the batch-level decoder over all V views.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from entityseg.data.views import SIZE_DIVISIBILITY, ViewConfig
from entityseg.models.checkpoint import load_error_reason
from entityseg.models.outputs import TUPLE_NAMES, CropFormerOutput, DecoderOutput

log = logging.getLogger(__name__)

#: ``mode`` of an exported file: the image-level outputs only (Image-O, also Mask2Former), or
#: both levels, which serve every Table 7 mode.
EXPORT_MODES = ("image_o", "batch_oc")
#: The graph's input and outputs (``batch_*`` only in ``batch_oc`` files), in the order of
#: ``CropFormerOutput.to_tuple`` (:data:`~entityseg.models.outputs.TUPLE_NAMES`).
INPUT_NAME = "views"
IMAGE_OUTPUTS = TUPLE_NAMES[:2]
BATCH_OUTPUTS = TUPLE_NAMES[2:]
#: Prefix of the metadata keys (ONNX ``metadata_props``, the ``.pt2``'s extra file's keys).
METADATA_PREFIX = "entityseg."
#: The extra file of a ``.pt2`` that holds the metadata (json).
PT2_METADATA_FILE = "entityseg.json"
#: Bumped when the graph's inputs, outputs or metadata change meaning.
FORMAT_VERSION = 1


def require(module: str) -> ModuleType:
    """Import an optional export dependency, or raise ImportError in one line naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is not installed: pip install 'entityseg[export]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from None


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file says about itself, so that it runs without the checkpoint."""

    views: ViewConfig  # the test views its inputs are made with (prediction_views)
    mode: str  # image_o | batch_oc (EXPORT_MODES)
    has_batch_decoder: bool  # the graph has the batch-level outputs
    compat: str  # the fusion's default compat (release for a converted release checkpoint)
    opset: int | None  # the ONNX opset (None for torch.export files)

    def to_metadata(self) -> dict[str, str]:
        """String key-value pairs (ONNX ``metadata_props`` are strings)."""
        values = {
            "format_version": FORMAT_VERSION,
            "views": dataclasses.asdict(self.views),
            "mode": self.mode,
            "has_batch_decoder": self.has_batch_decoder,
            "compat": self.compat,
            "opset": self.opset,
        }
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in values.items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str | Path) -> ExportInfo:
        """The info of :meth:`to_metadata`'s pairs; ValueError naming ``source`` if absent."""
        try:
            values = {
                key[len(METADATA_PREFIX) :]: json.loads(value)
                for key, value in metadata.items()
                if key.startswith(METADATA_PREFIX)
            }
            version = values.pop("format_version")
            views = values.pop("views")
            info = cls(views=_view_config(views), **values)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{source}: not a file written by python -m entityseg.export "
                f"(metadata {sorted(metadata)}: {err})"
            ) from None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source}: export format {version}; this entityseg reads {FORMAT_VERSION}"
            )
        return info


def _view_config(values: Mapping) -> ViewConfig:
    """A ViewConfig from its json form (lists back to tuples)."""
    return ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class _ViewsNetwork:
    """``CropFormer.forward`` around a function of one image's views (the exported graph).

    Subclasses give :meth:`run_views`: ``views [V, 3, H, W]`` -> the graph's outputs in order
    (:data:`IMAGE_OUTPUTS`, then :data:`BATCH_OUTPUTS` when ``has_batch_decoder``).
    """

    def __init__(self, info: ExportInfo) -> None:
        self.info = info
        self.views = info.views
        self.mode = info.mode
        self.has_batch_decoder = info.has_batch_decoder
        self.compat = info.compat

    def run_views(self, views: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> _ViewsNetwork:
        """``self`` on the CPU, as an ``nn.Module`` is moved (the exported file runs there)."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"an exported network runs on the CPU, not on {device}")
        return self

    def eval(self) -> _ViewsNetwork:
        """``self``: an exported network is always in inference mode."""
        return self

    def __call__(
        self, images: torch.Tensor, batch_level: bool = True, view_chunk: int | None = None
    ) -> CropFormerOutput:
        """``images [N, V, 3, H, W]`` -> :class:`~entityseg.models.outputs.CropFormerOutput`.

        As ``CropFormer.forward``: ``logits [N, V, Q, 2]``, ``masks [N, V, Q, H/4, W/4]``,
        ``aux`` empty (no deep-supervision outputs are exported); ``batch`` is None for
        ``batch_level=False`` and for files without the batch decoder. An image's views go
        through the graph at once (``view_chunk`` is accepted and has no effect); an
        ``image_o`` file decodes every view on its own, so it gets all N x V views at once.
        Outputs are float32 CPU tensors.
        """
        _check_input(images)
        images = images.detach().to("cpu", torch.float32)
        n, v = images.shape[:2]
        if not self.has_batch_decoder:  # views are independent: one run for all of them
            logits, masks = self.run_views(images.flatten(0, 1).contiguous())
            return CropFormerOutput(
                DecoderOutput(logits.unflatten(0, (n, v)), masks.unflatten(0, (n, v)))
            )
        per_image = [self.run_views(views.contiguous()) for views in images]
        batch = _stacked(per_image, len(IMAGE_OUTPUTS)) if batch_level else None
        return CropFormerOutput(_stacked(per_image, 0), batch)


def _check_input(images: torch.Tensor) -> None:
    """ValueError unless ``images`` is ``[N, V, 3, H, W]`` with H, W multiples of 32 (the
    exported graph assumes it and does not check)."""
    shape = tuple(images.shape)
    if (
        len(shape) != 5
        or shape[2] != 3
        or min(shape[:2]) < 1
        or shape[-2] % SIZE_DIVISIBILITY
        or shape[-1] % SIZE_DIVISIBILITY
    ):
        raise ValueError(
            f"images {list(shape)}: expected [N, V, 3, H, W], V >= 1, H and W multiples of "
            f"{SIZE_DIVISIBILITY} (data.views.collate_views makes them)"
        )


def _stacked(per_image: list[list[torch.Tensor]], first: int) -> DecoderOutput:
    """One decoder's ``logits`` and ``masks`` of every image, stacked on a new image axis."""
    logits = torch.stack([outputs[first] for outputs in per_image])  # [N, V, Q, 2]
    masks = torch.stack([outputs[first + 1] for outputs in per_image])  # [N, V, Q, h, w]
    return DecoderOutput(logits, masks)


class OnnxNetwork(_ViewsNetwork):
    """An exported ONNX file run by onnxruntime on the CPU, called as ``CropFormer``.

    Attributes: ``views`` (the :class:`ViewConfig` to make its inputs with), ``mode``,
    ``has_batch_decoder``, ``compat`` (the fusion's default), ``info`` (all of them and the
    opset). ``threads``: onnxruntime's intra-op threads (None: its default, all cores).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: exported network not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        super().__init__(ExportInfo.from_metadata(metadata, path))
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run_views(self, views: torch.Tensor) -> list[torch.Tensor]:
        arrays = self.session.run(self.output_names, {INPUT_NAME: views.numpy()})
        return [torch.from_numpy(array) for array in arrays]


class ExportedNetwork(_ViewsNetwork):
    """A ``torch.export`` file (``.pt2``, ``format=torch_export``), called as ``CropFormer``.

    The program runs on the CPU in PyTorch (no Python model code is needed to load it; the
    same torch version is). Its guards are not checked: they record the example's V > 1 and
    Swin window counts (more than one window per stage), which the traced graph does not
    depend on (traced size-obliviously by ``entityseg.export``; tested at V = 1); the input's
    shape is checked here instead.

    Loading a ``.pt2`` may run code stored in it (``torch.export.load`` unpickles parts of the
    file without restriction): open only files from a source you trust, and exchange networks
    as ONNX (:class:`OnnxNetwork`), which holds no code. Each load logs a warning saying so; a
    file that does not load raises ValueError in one line naming it.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: exported network not found")
        log.warning(
            "%s: loading a .pt2 may run code stored in it; open only files from a source you "
            "trust (ONNX, EntitySegmenter.from_onnx, is the safe exchange format)",
            path,
        )
        extra_files = {PT2_METADATA_FILE: ""}
        try:
            program = torch.export.load(path, extra_files=extra_files)
        except Exception as err:  # a damaged or foreign file fails anywhere in the loader
            reason = load_error_reason(err)
            raise ValueError(f"{path}: not a torch.export .pt2 ({reason})") from None
        metadata = json.loads(extra_files[PT2_METADATA_FILE] or "{}")
        super().__init__(ExportInfo.from_metadata(metadata, path))
        self.module = program.module(check_guards=False)

    @torch.inference_mode()
    def run_views(self, views: torch.Tensor) -> list[torch.Tensor]:
        return list(self.module(views))
