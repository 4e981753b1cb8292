"""How a network's outputs become entities: one frozen settings object, checked once.

:class:`InferenceSettings` holds the keys of ``conf/inference/default.yaml``. It is built from
that config (:meth:`InferenceSettings.from_config`) or from keywords, validated once in
``__post_init__`` (a bad value raises :class:`~entityseg.config.ConfigError` naming the
``inference.*`` key), and then passed whole: to
:class:`~entityseg.api.EntitySegmenter`, :func:`~entityseg.inference.runner.run_modes`,
the fusion (:func:`~entityseg.inference.fusion.fuse_entities`), the LightningModule's
validation and the command lines. Training checkpoints store it (:meth:`to_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from entityseg.config import ConfigError

#: The inference modes of the paper's Table 7, and the names it prints them with.
PAPER_NAMES = {
    "image_o": "Image-O",
    "batch_o": "Batch-O",
    "batch_c": "Batch-C",
    "batch_oc": "Batch-OC",
}
INFERENCE_MODES = tuple(PAPER_NAMES)

#: ``compat`` values: our fusion, or the release's test views, scores, order and empty masks.
COMPAT_MODES = ("entityseg", "release")

#: ``precision`` -> the autocast dtype of the network (None: no autocast, float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def check_mode(mode: str, key: str = "inference.mode") -> None:
    """Raise :class:`ConfigError` for a mode that is not one of Table 7's four."""
    if mode not in INFERENCE_MODES:
        raise ConfigError(
            key, mode, f"unknown inference mode; expected one of {list(INFERENCE_MODES)}"
        )


@dataclass(frozen=True)
class InferenceSettings:
    """The ``inference`` settings of ``conf/inference/default.yaml`` (the defaults here are
    its values), valid by construction.

    Attributes:
        mode: the Table 7 mode of one prediction (``predict``, the API, the app).
        modes: the modes validation and ``evaluate`` score, every one listed.
        max_entities: entities kept per image, by score, after fusion.
        overlapping: keep each query's own mask (the paper's "AP" beside AP^e) instead of
            painting them into one non-overlapping map.
        query_chunk: queries fused at once at the original resolution (peak memory).
        compat: ``entityseg``, ``release`` (the release's test views, scores and order, bit
            for bit) or None: the checkpoint's (``release`` for a converted release file).
        view_chunk: views through the backbone and pixel decoder at once: ``auto`` (1 on the
            CPU, all on a GPU), an integer >= 1, or None (all).
        cuda_graphs: replay each input size's forward from a captured CUDA graph (GPU only).
        score_threshold: entities scoring less are dropped after fusion (0 keeps every one,
            as AP^e needs).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:1``, ...
        precision: ``fp32``, or ``bf16`` (the network under bf16 autocast).
        compare: two modes ``predict`` puts side by side for every image (``[image_o,
            batch_oc]``: the first is the baseline), or none: the picture
            ``<stem>_compare.jpg``, the counts of matched, recovered, merged and split
            entities (:mod:`~entityseg.inference.compare`) and their sum over the input.
        batch_size: images ``predict`` and ``evaluate`` load at once; those of one network
            input size go through the network together (a smaller image is never padded to
            another's size, which would change its entities).
    """

    mode: str = "batch_oc"
    modes: tuple[str, ...] = INFERENCE_MODES
    max_entities: int = 100
    overlapping: bool = False
    query_chunk: int = 16
    compat: str | None = None
    view_chunk: int | str | None = "auto"
    cuda_graphs: bool = False
    score_threshold: float = 0.0
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 1
    compare: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        modes = self.modes
        if isinstance(modes, str) or not isinstance(modes, Iterable):
            raise ConfigError("inference.modes", modes, "must be a list of modes")
        object.__setattr__(self, "modes", tuple(modes))
        if not self.modes:
            raise ConfigError("inference.modes", list(modes), "must list at least one mode")
        for mode in self.modes:
            check_mode(mode, "inference.modes")
        check_mode(self.mode)
        if not _integer(self.max_entities) or self.max_entities < 0:
            raise ConfigError(
                "inference.max_entities", self.max_entities, "must be an integer >= 0"
            )
        for key in ("overlapping", "cuda_graphs"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"inference.{key}", getattr(self, key), "must be true or false")
        compare = self.compare
        if isinstance(compare, str) or not isinstance(compare, Iterable):
            raise ConfigError("inference.compare", compare, "must be a list of two modes, or []")
        object.__setattr__(self, "compare", tuple(compare))
        if self.compare and (len(self.compare) != 2 or len(set(self.compare)) != 2):
            raise ConfigError(
                "inference.compare", list(compare), "must be two different modes, or []"
            )
        for mode in self.compare:
            check_mode(mode, "inference.compare")
        if not _integer(self.batch_size) or self.batch_size < 1:
            raise ConfigError("inference.batch_size", self.batch_size, "must be an integer >= 1")
        if not _integer(self.query_chunk) or self.query_chunk < 1:
            raise ConfigError("inference.query_chunk", self.query_chunk, "must be an integer >= 1")
        if self.compat is not None and self.compat not in COMPAT_MODES:
            raise ConfigError(
                "inference.compat", self.compat, f"unknown; expected one of {list(COMPAT_MODES)}"
            )
        if self.compat == "release" and self.overlapping:
            raise ConfigError(
                "inference.compat",
                self.compat,
                "the release has non-overlapping entities only (inference.overlapping=false)",
            )
        chunk = self.view_chunk
        if not (chunk is None or chunk == "auto" or (_integer(chunk) and chunk >= 1)):
            raise ConfigError(
                "inference.view_chunk", chunk, "must be auto, null or an integer >= 1"
            )
        threshold = self.score_threshold
        if not (isinstance(threshold, int | float) and not isinstance(threshold, bool)):
            raise ConfigError("inference.score_threshold", threshold, "must be in [0, 1]")
        if not 0 <= threshold <= 1:
            raise ConfigError("inference.score_threshold", threshold, "must be in [0, 1]")
        object.__setattr__(self, "score_threshold", float(threshold))
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "inference.precision",
                self.precision,
                f"is unknown; expected one of {list(PRECISIONS)}",
            )
        if self.device != "auto":  # a device torch cannot read fails here, not at the first image
            self.torch_device()

    @classmethod
    def from_config(cls, node: Mapping[str, Any], **changes: Any) -> InferenceSettings:
        """The settings of an ``inference`` config node (``cfg.inference``), with ``changes``
        on top; a key that is not a setting raises :class:`ConfigError`."""
        values = {**node, **changes}
        known = list(cls.names())
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"inference.{key}", values[key], f"unknown setting; expected one of {known}"
                )
        return cls(**values)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of the settings (the ``conf/inference`` keys)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> InferenceSettings:
        """These settings with ``changes`` (validated as any new settings are)."""
        return self.from_config(self.to_dict(), **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as json values (``modes`` a list), as checkpoints store them."""
        values = {key: getattr(self, key) for key in self.names()}
        values["modes"] = list(self.modes)
        values["compare"] = list(self.compare)
        return values

    def torch_device(self) -> torch.device:
        """:attr:`device` as torch reads it (``auto``: CUDA when present, else the CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError("inference.device", self.device, f"not a device ({err})") from None

    def views_at_once(self, device: torch.device | str) -> int | None:
        """:attr:`view_chunk` as ``CropFormer.forward`` takes it on ``device``.

        ``auto``: one view at a time on the CPU, where the views' activations dominate the
        peak memory and a bigger batch gains little speed; all views at once on a GPU, where
        each extra pass costs thousands of kernel launches.
        """
        if self.view_chunk == "auto":
            return 1 if torch.device(device).type == "cpu" else None
        return self.view_chunk

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The network's autocast dtype (None: float32, no autocast)."""
        return PRECISIONS[self.precision]

    @property
    def fusion_compat(self) -> str:
        """The compat the fusion runs: :attr:`compat`, or ``entityseg`` when it is left to a
        checkpoint that did not say."""
        return self.compat or "entityseg"


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
