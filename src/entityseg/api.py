"""Entity masks of any image from a checkpoint: the one inference object under every entry point.

>>> from entityseg import EntitySegmenter
>>> segmenter = EntitySegmenter.from_checkpoint("last.ckpt")
>>> entities = segmenter("photo.jpg")  # Entities: rles, scores, masks(), to_id_map(), ...
>>> segmenter = EntitySegmenter.from_pretrained("cropformer_hornet_3x")  # a released model
>>> segmenter.save_pretrained("my-model")  # safetensors, config.json, model card

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
Keyword overrides change any of it: the fields of
:class:`~entityseg.inference.settings.InferenceSettings` and the test-view keys of
:attr:`ViewConfig.TEST_KEYS <entityseg.data.views.ViewConfig.TEST_KEYS>`; a checkpoint that
stores no views (written before they were stored) needs ``views=``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from entityseg.config import ConfigError, command_line_keys, instantiate_checked
from entityseg.data.coco_entity import ImageInput, rgb_image
from entityseg.data.views import ViewConfig, collate_views, prediction_views
from entityseg.inference.cuda_graphs import graphed
from entityseg.inference.fusion import Entities
from entityseg.inference.runner import ModeResults, run_modes
from entityseg.inference.settings import INFERENCE_MODES, InferenceSettings, check_mode
from entityseg.interop.release import release_sized, release_view_keys
from entityseg.models.checkpoint import (
    INFERENCE_KEY,
    NET_CONFIG_KEY,
    TEST_VIEWS_KEY,
    VIEWS_KEY,
    CheckpointError,
    build_network,
    read_checkpoint,
    stored_network,
)
from entityseg.models.pretrained import (
    PRETRAINED_KEY,
    STORED_SETTINGS,
    is_pretrained_folder,
    model_config,
    read_model_config,
    weights_file,
    write_pretrained,
)

if TYPE_CHECKING:
    from entityseg.hub.card import CardInfo

log = logging.getLogger(__name__)

#: Test views as :meth:`EntitySegmenter.from_checkpoint` takes them: a ``ViewConfig`` or the
#: ``data`` config's test keys (``ViewConfig.TEST_KEYS``; missing ones take the release's recipe).
Views = ViewConfig | Mapping[str, Any]


class EntitySegmenter:
    """A network and how to run it: images in, :class:`~entityseg.inference.fusion.Entities`
    out.

    Usually made by :meth:`from_checkpoint`. ``views``: the test-time views
    (:class:`~entityseg.data.views.ViewConfig`); ``settings``: how to run the network and fuse
    its outputs (:class:`~entityseg.inference.settings.InferenceSettings`, the
    ``conf/inference`` keys), with keyword ``changes`` on top, e.g. ``device="cpu"``. A
    Mask2Former network, without the batch decoder, predicts with ``image_o``, saying so once
    in the log. ``settings.compat`` left to the checkpoint (None) is ``entityseg`` here.
    """

    def __init__(
        self,
        net: nn.Module,
        views: ViewConfig,
        settings: InferenceSettings | None = None,
        **changes: Any,
    ) -> None:
        settings = settings or InferenceSettings()
        if changes:
            settings = settings.replace(**changes)
        if settings.compat is None:
            settings = settings.replace(compat=settings.fusion_compat)
        self.views = views
        self.device = settings.torch_device()
        self.net = net.to(self.device).eval()
        (mode,) = self.usable_modes([settings.mode])
        self.settings = settings if mode == settings.mode else settings.replace(mode=mode)
        self._forward = graphed(self.net, settings.cuda_graphs, self.device)  # one graph cache
        #: the weights' file (a checkpoint, or a model folder's safetensors), when loaded from one
        self.checkpoint: Path | None = None
        #: where the weights came from (a converted release file's Hub record, a checkpoint)
        self.origin: dict[str, Any] = {}
        #: the model card of the folder it was loaded from, kept by :meth:`save_pretrained`
        self.card: CardInfo | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        settings: InferenceSettings | None = None,
        *,
        views: Views | None = None,
        default_views: Views | None = None,
        network: Callable[[], nn.Module] | None = None,
        compile: bool = False,
        **overrides: Any,
    ) -> EntitySegmenter:
        """The segmenter of a training checkpoint or a converted release checkpoint, run as the
        checkpoint says (see the module docstring).

        ``settings``: the inference settings (default: ``conf/inference``'s); ``overrides``:
        keywords on top, any field of :class:`InferenceSettings` (``mode="image_o"``,
        ``device="cpu"``, ``max_entities=50``) or test-view key of ``ViewConfig.TEST_KEYS``
        (``test_crop_layout="fixed8"``, ``crop_delta=0.6``), applied on top of the
        checkpoint's views. ``compat="release"`` sizes the crop views as the release does
        (:func:`~entityseg.interop.release.release_sized`) unless ``test_crop_resize`` is
        given. ``views`` replaces the checkpoint's views; ``default_views`` serves only when
        the checkpoint stores none (the CLIs pass the ``data`` config's); ``network`` builds
        the network when the checkpoint stores no configuration (older files: the CLIs pass
        the ``model.net`` config). ``compile``: ``torch.compile`` the backbone and pixel
        decoder.

        Raises ``FileNotFoundError`` for a missing file, :class:`CheckpointError` (one line)
        for a file that is not an entityseg checkpoint, stores no views, or does not fit its
        network, and :class:`ConfigError` for an unknown keyword or a bad value.
        """
        changes, view_changes = _split_overrides(overrides)
        settings = settings or InferenceSettings()
        if changes:
            settings = settings.replace(**changes)  # a bad value: before the file is read
        checkpoint = read_checkpoint(path)
        if checkpoint.get(NET_CONFIG_KEY) is None and network is None:
            raise CheckpointError(
                f"{path}: not an entityseg checkpoint (it stores no network configuration, "
                f"{NET_CONFIG_KEY!r}): use one written by entityseg.train, or convert a release "
                "file with python -m entityseg.convert_release"
            )
        if settings.compat is None:
            settings = settings.replace(compat=stored_compat(checkpoint))
        keys = _resolve_view_keys(path, checkpoint, views, default_views)
        test_views = ViewConfig.from_keys({**keys, **view_changes})
        if settings.compat == "release" and "test_crop_resize" not in view_changes:
            test_views = release_sized(test_views)
        net = build_network(path, network, checkpoint)
        if compile:
            net.compile_parts()
        log.info("%s: compat=%s, test views %s", path, settings.compat, test_views)
        segmenter = cls(net, test_views, settings)
        segmenter._remember_source(path, checkpoint)
        return segmenter

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        settings: InferenceSettings | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        **overrides: Any,
    ) -> EntitySegmenter:
        """The segmenter of a released model by name, a model on the Hub, or a model folder.

        ``name``: one of :data:`entityseg.zoo.NAMES` (``"cropformer_hornet_3x"``: downloaded
        from the release's Hub repository and converted once, then cached), a Hub repository
        ``"user/name"`` written by :meth:`push_to_hub`, or a local folder of
        :meth:`save_pretrained` (a ``.ckpt`` works too). ``revision``, ``token`` and
        ``cache_dir`` are ``huggingface_hub``'s (``HF_TOKEN``, ``hf auth login``,
        ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` apply). ``settings``: default, the inference
        settings the model was saved with (its mode, fusion and compat); ``overrides`` as
        :meth:`from_checkpoint`'s. Raises :class:`~entityseg.hub.HubError` (a
        :class:`CheckpointError`) in one line when the model cannot be had: an unknown name,
        a gated repository without access, offline with nothing cached, a download cut off.
        """
        from entityseg.hub import resolve_model

        path = resolve_model(name, revision=revision, token=token, cache_dir=cache_dir)
        if settings is None and is_pretrained_folder(path):
            stored = read_model_config(path).get("inference", {})
            settings = InferenceSettings(
                **{k: v for k, v in stored.items() if k in STORED_SETTINGS}
            )
        return cls.from_checkpoint(path, settings, **overrides)

    def save_pretrained(self, folder: str | Path, card: CardInfo | None = None) -> Path:
        """Write this model as a folder anyone can open safely: ``model.safetensors`` (no
        pickle), ``config.json`` (network, test views, compat, inference settings, the
        entityseg version) and ``README.md``, a model card (``card``: default, the card of
        the model it was loaded from, else one made from the network and, for a training
        checkpoint, its run's recipe and last evaluation). :meth:`from_pretrained` loads it.
        """
        from entityseg.hub.card import write_model_card
        from entityseg.hub.run_card import checkpoint_card

        config = getattr(self.net, "config", None)
        if config is None:
            raise CheckpointError(
                f"{type(self.net).__name__}: an exported network has no PyTorch weights to "
                "save; save the segmenter of its checkpoint"
            )
        if (
            self.checkpoint is not None
            and Path(folder).resolve() == self.checkpoint.parent.resolve()
        ):
            raise CheckpointError(
                f"{folder}: is the folder this model was loaded from; choose another one"
            )
        card = card or self.card or checkpoint_card(self.checkpoint, config, self.origin)
        network = stored_network(config)
        settings = self.settings.to_dict()
        write_pretrained(
            folder,
            self.net.state_dict(),
            model_config(network, self.views.to_keys(), settings, self.origin),
        )
        write_model_card(folder, card)
        return Path(folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        card: CardInfo | None = None,
        commit_message: str = "Upload entityseg model",
    ) -> str:
        """Upload this model to the Hub repository ``repo_id`` (created when missing, as a
        model repository) in the format of :meth:`save_pretrained`, with ``huggingface_hub``'s
        upload; returns the commit's URL. Anyone can then
        ``EntitySegmenter.from_pretrained(repo_id)``."""
        import tempfile

        from entityseg.hub.repos import push_model_folder

        with tempfile.TemporaryDirectory(prefix="entityseg-push-") as tmp:
            self.save_pretrained(tmp, card)
            return push_model_folder(
                tmp, repo_id, private=private, token=token, commit_message=commit_message
            )

    @classmethod
    def from_onnx(
        cls, path: str | Path, *, threads: int | None = None, **overrides: Any
    ) -> EntitySegmenter:
        """The segmenter of an ONNX file of ``python -m entityseg.export``, run by onnxruntime
        on the CPU through the same views and fusion as the PyTorch network.

        The file says how to run it (its test views, mode and compat, written at export);
        ``overrides`` (as :meth:`from_checkpoint`'s, ``mode=`` included) change it.
        ``threads``: onnxruntime's threads (None: all cores).
        """
        from entityseg.inference.exported import OnnxNetwork

        return cls._from_exported(OnnxNetwork(path, threads), overrides)

    @classmethod
    def from_torch_export(cls, path: str | Path, **overrides: Any) -> EntitySegmenter:
        """The segmenter of a ``.pt2`` of ``python -m entityseg.export format=torch_export``,
        as :meth:`from_onnx` (the program runs in PyTorch on the CPU).

        Loading a ``.pt2`` may run code stored in it (``torch.export.load`` unpickles parts of
        the file without restriction): open only files from a source you trust; ONNX
        (:meth:`from_onnx`) is the safe format to exchange networks in. Each load logs a
        warning saying so; a file that does not load raises ValueError in one line naming it.
        """
        from entityseg.inference.exported import ExportedNetwork

        return cls._from_exported(ExportedNetwork(path), overrides)

    @classmethod
    def _from_exported(cls, net, overrides: Mapping[str, Any]) -> EntitySegmenter:
        changes, view_changes = _split_overrides(overrides)
        settings = InferenceSettings(mode=net.mode, compat=net.compat, device="cpu")
        settings = settings.replace(**changes)
        views = ViewConfig.from_keys({**net.views.to_keys(), **view_changes})
        return cls(net, views, settings)

    @torch.inference_mode()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], mode: str | None = None
    ) -> Entities | list[Entities]:
        """The entities of one image, or of each image of a list (one :class:`Entities` each).

        An image is a file path, a PIL image of any mode (converted as files are read: EXIF
        orientation, palette, alpha, greyscale, 16-bit) or an RGB uint8 array [H, W, 3].
        Images go through the network one at a time, so a list may mix sizes and an image's
        entities do not depend on the others. ``mode``: another Table 7 mode than
        ``settings.mode``. An unreadable file raises ``EntityDataError`` naming it.
        """
        single = not isinstance(images, list | tuple)
        entities = [self.segment(x, mode) for x in ([images] if single else images)]
        return entities[0] if single else entities

    def segment(self, image: ImageInput, mode: str | None = None) -> Entities:
        """The entities of one image (anything :meth:`__call__` takes) in ``mode`` (default
        ``settings.mode``)."""
        (mode,) = self.usable_modes([mode or self.settings.mode])
        return self.segment_modes(image, [mode])[mode]

    def segment_modes(
        self, image: ImageInput, modes: Sequence[str] | None = None
    ) -> dict[str, Entities]:
        """The entities of one image (anything :meth:`__call__` takes) in each of ``modes``
        (default: every mode this network runs; the batch modes share one forward of the
        views), e.g. Image-O beside Batch-OC. A mode the network cannot run is left out
        (:meth:`usable_modes`)."""
        for mode in modes or ():
            check_mode(mode)
        modes = self.usable_modes(modes)
        sample = prediction_views(rgb_image(image), self.views)  # images [V, 3, h, w]
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
        forward times: what ``runner.run_modes`` returns, with these settings; entities
        scoring under ``settings.score_threshold`` are dropped. ``modes``: default
        ``[settings.mode]``."""
        for mode in modes or ():
            check_mode(mode)
        modes = self.usable_modes(modes or [self.settings.mode])
        results = run_modes(
            self._forward,
            batches,
            modes,
            self.device,
            self.settings,
            description=description,
            show_progress=show_progress,
        )
        if self.settings.score_threshold > 0:
            for result in results.values():
                result.entities = {
                    image_id: entities.scoring_at_least(self.settings.score_threshold)
                    for image_id, entities in result.entities.items()
                }
        return results

    def replace(self, **overrides: Any) -> EntitySegmenter:
        """This segmenter with other settings, sharing its network (nothing is loaded again):
        ``overrides`` as :meth:`from_checkpoint`'s, e.g. ``replace(test_crop_layout="fixed8",
        crop_delta=0.6, overlapping=True)``."""
        changes, view_changes = _split_overrides(overrides)
        settings = self.settings.replace(**changes)
        views = self.views
        if view_changes:
            views = ViewConfig.from_keys({**views.to_keys(), **view_changes})
        segmenter = EntitySegmenter(self.net, views, settings)
        segmenter.checkpoint, segmenter.origin, segmenter.card = (
            self.checkpoint,
            self.origin,
            self.card,
        )
        return segmenter

    def _remember_source(self, path: str | Path, checkpoint: Mapping) -> None:
        """Where this model's weights came from, for :meth:`save_pretrained`'s card and
        ``predict``'s record of its run."""
        self.checkpoint = weights_file(path)
        if PRETRAINED_KEY in checkpoint:
            self.origin = dict(checkpoint[PRETRAINED_KEY].get("source") or {})
            from entityseg.hub.card import read_card_info

            self.card = read_card_info(path)
        elif checkpoint.get("entityseg_source"):  # converted from a release file
            self.origin = {k: str(v) for k, v in checkpoint["entityseg_source"].items()}
        else:
            self.origin = {"checkpoint": str(Path(path).resolve())}

    def usable_modes(self, modes: Sequence[str] | None = None) -> list[str]:
        """``modes`` (default: all four of Table 7) without those the network cannot run: a
        Mask2Former network (no batch decoder) runs ``image_o`` instead of the batch modes
        (one log line)."""
        modes = list(INFERENCE_MODES if modes is None else modes)
        if self.net.has_batch_decoder or all(m == "image_o" for m in modes):
            return list(modes)
        log.info(
            "inference mode %s needs CropFormer's batch decoder; this Mask2Former network "
            "predicts with image_o",
            ", ".join(m for m in modes if m != "image_o"),
        )
        return ["image_o"]

    def settings_record(self) -> dict:
        """What makes this segmenter's entities differ from another's (json values): mode,
        fusion and precision settings and every view setting."""
        return {
            **{
                f"inference.{key}": getattr(self.settings, key)
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


def segmenter_from_config(
    cfg: DictConfig, settings: InferenceSettings | None = None
) -> EntitySegmenter:
    """The segmenter of ``cfg.ckpt_path`` with the ``inference`` settings of ``cfg``: what
    ``evaluate``, ``predict``, ``export`` and the app run.

    Test views: the checkpoint's, with the ``data.*`` test keys that the command line sets on
    top (:func:`~entityseg.config.command_line_keys`; an experiment's or a data config's
    values do not count); a checkpoint that stores none takes the ``data`` config's, and one
    that stores no network configuration is loaded into ``model.net``. ``inference.compat:
    null`` is the checkpoint's (``release`` for a converted release checkpoint). ``ckpt_path``
    may name a released model or a Hub repository (:func:`entityseg.hub.resolve_model`). A
    file that is missing or not a checkpoint, or a model the Hub does not give, raises
    :class:`CheckpointError` naming ``ckpt_path``.
    ``settings``: ``cfg.inference`` as the caller read it already (None: read here).
    """
    settings = settings or InferenceSettings.from_config(cfg.inference)
    data_keys = ViewConfig.test_keys_of(cfg.data)
    given = command_line_keys("data") & set(ViewConfig.TEST_KEYS)
    from entityseg.hub import resolve_model

    try:
        return EntitySegmenter.from_checkpoint(
            resolve_model(cfg.ckpt_path),
            settings,
            default_views=data_keys,
            network=lambda: instantiate_checked(cfg.model.net, "model.net"),
            compile=cfg.model.compile,
            **{key: data_keys[key] for key in sorted(given)},
        )
    except (FileNotFoundError, CheckpointError) as err:
        raise CheckpointError(f"ckpt_path={cfg.ckpt_path}: {err}") from None


def stored_compat(checkpoint: Mapping) -> str:
    """The checkpoint's compat: ``release`` for a converted release checkpoint, else the one
    its training run validated with (``entityseg`` when it says none)."""
    if checkpoint.get(TEST_VIEWS_KEY) is not None:
        return "release"
    inference = checkpoint.get(INFERENCE_KEY)
    if inference is None:  # written before checkpoints stored the settings
        inference = (checkpoint.get("hyper_parameters") or {}).get("inference") or {}
    return inference.get("compat") or "entityseg"


def stored_view_keys(checkpoint: Mapping) -> dict | None:
    """The test-view keys a checkpoint stores (``ViewConfig.TEST_KEYS``), or None.

    A converted release checkpoint's are the release's sizes, crops and normalisation; its
    crop sizing is left to ``compat`` (:func:`~entityseg.interop.release.release_sized`).
    """
    if checkpoint.get(VIEWS_KEY) is not None:
        return ViewConfig.test_keys_of(checkpoint[VIEWS_KEY])
    if checkpoint.get(TEST_VIEWS_KEY) is not None:
        return release_view_keys(checkpoint[TEST_VIEWS_KEY])
    return None


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
        return views.to_keys()
    if isinstance(views, Mapping):  # checked with the overrides (ViewConfig.from_keys)
        return dict(views)
    raise ConfigError("views", views, "must be a ViewConfig or a dict of test-view keys")


def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Keyword overrides as (inference settings, test-view keys); an unknown one raises."""
    settings, views = {}, {}
    for key, value in overrides.items():
        if key in InferenceSettings.names():
            settings[key] = value
        elif key in ViewConfig.TEST_KEYS:
            views[key] = value
        else:
            known = [*InferenceSettings.names(), *ViewConfig.TEST_KEYS]
            raise ConfigError(key, value, f"unknown setting; expected one of {known}")
    return settings, views
