"""Entity masks of any image from a checkpoint: the one inference object under every entry point.

>>> from entityseg import EntitySegmenter
>>> segmenter = EntitySegmenter.from_checkpoint("last.ckpt")
>>> entities = segmenter("photo.jpg")  # Entities: rles, scores, masks(), to_id_map(), ...

``predict``, ``evaluate``, the demo and the notebook infer through :class:`EntitySegmenter`, as
a user does: views made by :func:`~entityseg.data.views.prediction_views`, batches by
:func:`~entityseg.data.views.collate_views`, the network and the fusion run by
:func:`~entityseg.inference.runner.run_modes`, the same path validation takes.

A checkpoint says how to run it, so nothing else needs to be said:
  * the network: its configuration (``NET_CONFIG_KEY``), as training and
    ``entityseg.convert_release`` store it;
  * the test views (short side, max size, crops, delta, normalisation, crop sizing): a training
    checkpoint's ``VIEWS_KEY`` (the ``data`` config's test keys the run validated with), or a
    converted release checkpoint's ``TEST_VIEWS_KEY`` (the release config's test settings);
  * ``compat``: ``release`` for a converted release checkpoint (its entities, bit for bit),
    else the compat the training run validated with (``entityseg`` by default).
Keyword overrides change any of it; a checkpoint that stores no views (written before they were
stored) needs ``views=``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from entityseg.config import ConfigError
from entityseg.data.coco_entity import ImageInput, rgb_image
from entityseg.data.datamodule import (
    TEST_VIEW_KEYS,
    check_test_view_keys,
    test_view_config,
    view_config_keys,
    view_keys,
)
from entityseg.data.views import ViewConfig, collate_views, prediction_views
from entityseg.inference.cuda_graphs import check_cuda_graphs, graphed
from entityseg.inference.fusion import Entities, check_compat, check_mode
from entityseg.inference.runner import ModeResults, check_precision, resolve_view_chunk, run_modes
from entityseg.interop.release import release_data_overrides
from entityseg.models.checkpoint import (
    NET_CONFIG_KEY,
    TEST_VIEWS_KEY,
    VIEWS_KEY,
    CheckpointError,
    build_network,
    read_checkpoint,
)

log = logging.getLogger(__name__)

#: Settings of ``conf/inference/default.yaml`` that :meth:`EntitySegmenter.from_checkpoint`
#: takes as keywords, besides ``mode``, ``device`` and ``precision``.
INFERENCE_KEYS = (
    "max_entities",
    "overlapping",
    "query_chunk",
    "compat",
    "view_chunk",
    "cuda_graphs",
    "score_threshold",
)

#: Test views as :meth:`EntitySegmenter.from_checkpoint` takes them: a ``ViewConfig`` or the
#: ``data`` config's test keys (``TEST_VIEW_KEYS``; missing ones take the release's recipe).
Views = ViewConfig | Mapping[str, Any]


def pick_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError("inference.device", name, f"not a device ({err})") from None


def check_inference_settings(
    max_entities: int,
    overlapping: bool,
    query_chunk: int,
    compat: str,
    view_chunk: int | str | None,
    cuda_graphs: bool,
    score_threshold: float = 0.0,
) -> None:
    """Raise :class:`ConfigError` naming the ``inference.*`` key of a value that cannot work."""
    if not _integer(max_entities) or max_entities < 0:
        raise ConfigError("inference.max_entities", max_entities, "must be an integer >= 0")
    if not isinstance(overlapping, bool):
        raise ConfigError("inference.overlapping", overlapping, "must be true or false")
    if not _integer(query_chunk) or query_chunk < 1:
        raise ConfigError("inference.query_chunk", query_chunk, "must be an integer >= 1")
    try:
        check_compat(compat, overlapping)
    except ValueError as err:
        raise ConfigError("inference.compat", compat, str(err)) from None
    resolve_view_chunk(view_chunk, "cpu")
    check_cuda_graphs(cuda_graphs)
    number = isinstance(score_threshold, int | float) and not isinstance(score_threshold, bool)
    if not (number and 0 <= score_threshold <= 1):
        raise ConfigError("inference.score_threshold", score_threshold, "must be in [0, 1]")


def check_modes(modes: Iterable[str]) -> list[str]:
    """The modes as a list; :class:`ConfigError` on one that is not one of Table 7's four."""
    modes = list(modes)
    for mode in modes:
        try:
            check_mode(mode)
        except ValueError as err:
            raise ConfigError("inference.mode", mode, str(err)) from None
    return modes


class EntitySegmenter:
    """A network and how to run it: images in, :class:`~entityseg.inference.fusion.Entities`
    out.

    Usually made by :meth:`from_checkpoint`. ``views``: the test-time views
    (:class:`~entityseg.data.views.ViewConfig`); ``mode``: the Table 7 mode of ``__call__``
    (a Mask2Former network, without the batch decoder, predicts with ``image_o``, saying so
    once in the log); ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda:1``, ...;
    ``precision``: ``fp32`` or ``bf16`` (autocast). The keywords are
    ``conf/inference/default.yaml``'s (``score_threshold``: entities scoring less are dropped
    after fusion; 0 keeps every one, as AP^e needs). A bad value raises
    :class:`~entityseg.config.ConfigError` naming the config key (``inference.compat='x': ...``).
    """

    def __init__(
        self,
        net: nn.Module,
        views: ViewConfig,
        mode: str = "batch_oc",
        device: str | torch.device = "auto",
        precision: str = "fp32",
        *,
        max_entities: int = 100,
        overlapping: bool = False,
        query_chunk: int = 16,
        compat: str = "entityseg",
        view_chunk: int | str | None = "auto",
        cuda_graphs: bool = False,
        score_threshold: float = 0.0,
    ) -> None:
        check_precision(precision)
        check_inference_settings(
            max_entities, overlapping, query_chunk, compat, view_chunk, cuda_graphs, score_threshold
        )
        _check_views(view_config_keys(views))
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self.views = views
        self.precision = precision
        self.max_entities = max_entities
        self.overlapping = overlapping
        self.query_chunk = query_chunk
        self.compat = compat
        self.view_chunk = view_chunk
        self.cuda_graphs = cuda_graphs
        self.score_threshold = score_threshold
        self.mode = self.usable_modes(check_modes([mode]))[0]
        self._forward = graphed(self.net, cuda_graphs, self.device)  # one graph cache

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        mode: str = "batch_oc",
        device: str | torch.device = "auto",
        precision: str = "fp32",
        *,
        views: Views | None = None,
        default_views: Views | None = None,
        network: Callable[[], nn.Module] | None = None,
        compile: bool = False,
        **overrides: Any,
    ) -> EntitySegmenter:
        """The segmenter of a training checkpoint or a converted release checkpoint, run as the
        checkpoint says (see the module docstring).

        ``overrides``: the inference settings of :data:`INFERENCE_KEYS` and the test-view keys
        of ``TEST_VIEW_KEYS`` (e.g. ``test_crop_layout="fixed8"``, ``crop_delta=0.6``), applied
        on top of the checkpoint's views. ``compat="release"`` sizes each crop view by its own
        shortest edge, as the release does, unless ``test_crop_resize`` is overridden.
        ``views`` replaces the checkpoint's views; ``default_views`` serves only when the
        checkpoint stores none (the CLIs pass the ``data`` config's); ``network`` builds the
        network when the checkpoint stores no configuration (older files: the CLIs pass the
        ``model.net`` config). ``compile``: ``torch.compile`` the backbone and pixel decoder.

        Raises ``FileNotFoundError`` for a missing file, :class:`CheckpointError` (one line)
        for a file that is not an entityseg checkpoint, stores no views, or does not fit its
        network, and :class:`ConfigError` for an unknown keyword or a bad value.
        """
        _check_keywords(overrides)
        checkpoint = read_checkpoint(path)
        if checkpoint.get(NET_CONFIG_KEY) is None and network is None:
            raise CheckpointError(
                f"{path}: not an entityseg checkpoint (it stores no network configuration, "
                f"{NET_CONFIG_KEY!r}): use one written by entityseg.train, or convert a release "
                "file with python -m entityseg.convert_release"
            )
        settings = {k: overrides[k] for k in INFERENCE_KEYS if k in overrides}
        settings["compat"] = settings.get("compat") or stored_compat(checkpoint)
        check_modes([mode])
        check_precision(precision)
        check_inference_settings(**{**_DEFAULT_SETTINGS, **settings})
        keys = _resolve_view_keys(path, checkpoint, views, default_views)
        if settings["compat"] == "release":
            keys["test_crop_resize"] = "own"  # the release's test views
        keys.update({k: overrides[k] for k in TEST_VIEW_KEYS if k in overrides})
        _check_views(keys)
        net = build_network(path, network, checkpoint)
        if compile:
            net.compile_parts()
        views = test_view_config(**keys)
        log.info("%s: compat=%s, test views %s", path, settings["compat"], views)
        return cls(net, views, mode, device, precision, **settings)

    @classmethod
    def from_onnx(
        cls, path: str | Path, mode: str | None = None, threads: int | None = None, **overrides: Any
    ) -> EntitySegmenter:
        """The segmenter of an ONNX file of ``python -m entityseg.export``, run by onnxruntime
        on the CPU through the same views and fusion as the PyTorch network.

        The file says how to run it (its test views, mode and compat, written at export);
        ``mode`` and ``overrides`` (as :meth:`from_checkpoint`'s) change it. ``threads``:
        onnxruntime's threads (None: all cores).
        """
        from entityseg.inference.exported import OnnxNetwork

        return cls._from_exported(OnnxNetwork(path, threads), mode, overrides)

    @classmethod
    def from_torch_export(
        cls, path: str | Path, mode: str | None = None, **overrides: Any
    ) -> EntitySegmenter:
        """The segmenter of a ``.pt2`` of ``python -m entityseg.export format=torch_export``,
        as :meth:`from_onnx` (the program runs in PyTorch on the CPU).

        Loading a ``.pt2`` may run code stored in it (``torch.export.load`` unpickles parts of
        the file without restriction): open only files from a source you trust; ONNX
        (:meth:`from_onnx`) is the safe format to exchange networks in. Each load logs a
        warning saying so; a file that does not load raises ValueError in one line naming it.
        """
        from entityseg.inference.exported import ExportedNetwork

        return cls._from_exported(ExportedNetwork(path), mode, overrides)

    @classmethod
    def _from_exported(cls, net, mode: str | None, overrides: Mapping[str, Any]) -> EntitySegmenter:
        _check_keywords(overrides)
        settings = {k: overrides[k] for k in INFERENCE_KEYS if k in overrides}
        settings["compat"] = settings.get("compat") or net.compat
        keys = {
            **view_config_keys(net.views),
            **{k: overrides[k] for k in TEST_VIEW_KEYS if k in overrides},
        }
        _check_views(keys)
        return cls(net, test_view_config(**keys), mode or net.mode, "cpu", "fp32", **settings)

    @torch.inference_mode()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], mode: str | None = None
    ) -> Entities | list[Entities]:
        """The entities of one image, or of each image of a list (one :class:`Entities` each).

        An image is a file path, a PIL image of any mode (converted as files are read: EXIF
        orientation, palette, alpha, greyscale, 16-bit) or an RGB uint8 array [H, W, 3].
        Images go through the network one at a time, so a list may mix sizes and an image's
        entities do not depend on the others. ``mode``: another Table 7 mode than
        ``self.mode``. An unreadable file raises ``EntityDataError`` naming it.
        """
        single = not isinstance(images, list | tuple)
        entities = [self.segment(rgb_image(x), mode) for x in ([images] if single else images)]
        return entities[0] if single else entities

    def segment(self, image: np.ndarray, mode: str | None = None) -> Entities:
        """The entities of one RGB uint8 image [H, W, 3] (a checked array: ``__call__``)."""
        (mode,) = self.usable_modes([mode or self.mode])
        return self.segment_modes(image, [mode])[mode]

    def segment_modes(self, image: np.ndarray, modes: Sequence[str]) -> dict[str, Entities]:
        """The entities of one RGB uint8 image [H, W, 3] in each of ``modes`` (the batch modes
        share one forward of the views), e.g. Image-O beside Batch-OC. A mode the network
        cannot run is left out (:meth:`usable_modes`)."""
        sample = prediction_views(image, self.views)  # images [V, 3, h, w], crop_boxes [V, 4]
        sample.update(image_id=0, file_name="", num_skipped=0)
        results = self.run([collate_views([sample])], modes, show_progress=False)
        return {mode: result.entities[0] for mode, result in results.items()}

    def run(
        self,
        batches: Iterable[dict],
        modes: Sequence[str] | None = None,
        description: str = "inference",
        show_progress: bool = True,
    ) -> dict[str, ModeResults]:
        """Entities per mode of every image of collated test batches (a data loader of
        ``EntityDataModule``, whose views should be :attr:`views`), keyed by image id, and
        forward times: what ``runner.run_modes`` returns, with these settings.
        ``modes``: default ``[self.mode]``."""
        modes = self.usable_modes(check_modes(modes or [self.mode]))
        results = run_modes(
            self._forward,
            batches,
            modes,
            self.device,
            self.max_entities,
            self.overlapping,
            self.query_chunk,
            description=description,
            show_progress=show_progress,
            precision=self.precision,
            compat=self.compat,
            view_chunk=self.view_chunk,
        )
        if self.score_threshold > 0:
            for result in results.values():
                result.entities = {
                    image_id: entities.scoring_at_least(self.score_threshold)
                    for image_id, entities in result.entities.items()
                }
        return results

    def replace(self, mode: str | None = None, **overrides: Any) -> EntitySegmenter:
        """This segmenter with other settings, sharing its network (nothing is loaded again):
        ``overrides`` as :meth:`from_checkpoint`'s, e.g. ``replace(test_crop_layout="fixed8",
        crop_delta=0.6, overlapping=True)``."""
        _check_keywords(overrides)
        settings = {key: getattr(self, key) for key in INFERENCE_KEYS}
        settings.update({k: overrides[k] for k in INFERENCE_KEYS if k in overrides})
        keys = {**self.view_keys, **{k: overrides[k] for k in TEST_VIEW_KEYS if k in overrides}}
        _check_views(keys)
        return EntitySegmenter(
            self.net,
            test_view_config(**keys),
            mode or self.mode,
            self.device,
            self.precision,
            **settings,
        )

    def usable_modes(self, modes: Sequence[str]) -> list[str]:
        """``modes`` without those the network cannot run: a Mask2Former network (no batch
        decoder) runs ``image_o`` instead of the batch modes (one log line)."""
        if self.net.has_batch_decoder or all(m == "image_o" for m in modes):
            return list(modes)
        log.info(
            "inference mode %s needs CropFormer's batch decoder; this Mask2Former network "
            "predicts with image_o",
            ", ".join(m for m in modes if m != "image_o"),
        )
        return ["image_o"]

    @property
    def view_keys(self) -> dict:
        """The ``data`` keys that make :attr:`views` (``size_scale`` 1): build a data module
        with the same test views by passing them to ``EntityDataModule``."""
        return view_config_keys(self.views)

    def settings(self) -> dict:
        """What makes this segmenter's entities differ from another's (json values): mode,
        fusion and precision settings and every view setting."""
        return {
            **{
                f"inference.{key}": getattr(self, key)
                for key in (
                    "mode",
                    "max_entities",
                    "overlapping",
                    "score_threshold",
                    "precision",
                    "compat",
                )
            },
            **{f"views.{key}": value for key, value in asdict(self.views).items()},
        }


def stored_compat(checkpoint: Mapping) -> str:
    """The checkpoint's compat: ``release`` for a converted release checkpoint, else the one
    its training run validated with (``entityseg`` when it says none)."""
    if checkpoint.get(TEST_VIEWS_KEY) is not None:
        return "release"
    inference = (checkpoint.get("hyper_parameters") or {}).get("inference") or {}
    return inference.get("compat") or "entityseg"


def stored_view_keys(checkpoint: Mapping) -> dict | None:
    """The test-view keys a checkpoint stores (``TEST_VIEW_KEYS``), or None.

    A converted release checkpoint's are the release's sizes, crops and normalisation; its
    crop sizing (``test_crop_resize``) is left to ``compat`` (``own`` under ``release``).
    """
    if checkpoint.get(VIEWS_KEY) is not None:
        return view_keys(checkpoint[VIEWS_KEY])
    if checkpoint.get(TEST_VIEWS_KEY) is not None:
        return {**release_data_overrides(checkpoint[TEST_VIEWS_KEY]), "test_crop_resize": "same"}
    return None


#: The :data:`INFERENCE_KEYS` defaults of :class:`EntitySegmenter`, read from its signature.
_DEFAULT_SETTINGS = {
    key: parameter.default
    for key, parameter in inspect.signature(EntitySegmenter.__init__).parameters.items()
    if key in INFERENCE_KEYS
}


def _resolve_view_keys(
    path: str | Path, checkpoint: Mapping, views: Views | None, default_views: Views | None
) -> dict:
    """The test-view keys to use: ``views``, else the checkpoint's, else ``default_views``."""
    if views is not None:
        return _as_view_keys(views)
    stored = stored_view_keys(checkpoint)
    if stored is not None:
        return stored
    if default_views is not None:
        log.info("%s stores no test views: using the given ones", path)
        return _as_view_keys(default_views)
    raise CheckpointError(
        f"{path}: stores no test views (written before checkpoints kept them): pass "
        "views=ViewConfig(...) or views={'test_short_size': 800, 'test_max_size': 1333, ...} "
        "(the data config's test keys)"
    )


def _as_view_keys(views: Views) -> dict:
    if isinstance(views, ViewConfig):
        return view_config_keys(views)
    if isinstance(views, Mapping):
        unknown = sorted(set(views) - set(TEST_VIEW_KEYS))
        if unknown:
            raise ConfigError(
                "views", dict(views), f"unknown key {unknown[0]!r}; expected {TEST_VIEW_KEYS}"
            )
        return view_keys(views)
    raise ConfigError("views", views, "must be a ViewConfig or a dict of test-view keys")


def _check_keywords(overrides: Mapping[str, Any]) -> None:
    known = (*INFERENCE_KEYS, *TEST_VIEW_KEYS)
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(key, value, f"unknown setting; expected one of {list(known)}")


def _check_views(keys: Mapping) -> None:
    """:func:`check_test_view_keys`, its error naming the ``data.*`` key."""
    try:
        check_test_view_keys(keys)
    except ConfigError as err:
        raise ConfigError(f"data.{err.key}", err.value, err.problem) from None


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
