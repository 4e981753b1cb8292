"""The model card of an entityseg model: the ``README.md`` the Hub shows beside the weights.

:func:`model_card` turns one :class:`CardInfo` into a :class:`huggingface_hub.ModelCard`: a YAML
header made by ``huggingface_hub``'s own card classes (``ModelCardData``, with one
``EvalResult`` per inference mode and metric for the ``model-index``), and a short markdown
body: what the model is, its AP^e per Table 7 mode, how it was trained or where it was converted
from (with the release's credit and licence), how to load it, its limits and the paper.

The header also keeps the card's :class:`CardInfo` under an ``entityseg:`` key (all but the
metrics, which the ``model-index`` holds), so that a card can be rebuilt from itself:
:func:`refresh_card_metrics` puts the numbers of a new evaluation into an existing card and
keeps the rest. :func:`card_metrics` reads the numbers back; :func:`metrics_by_mode` groups the
flat metrics that training and ``evaluate`` log (``val/ap50_batch_oc``) by mode.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from entityseg.atomic_checkpoint import write_atomically
from entityseg.config import ConfigError, UserError
from entityseg.inference.settings import INFERENCE_MODES, PAPER_NAMES
from entityseg.zoo import LICENSE as RELEASE_LICENSE
from entityseg.zoo import released_model

#: ``architecture`` -> the Table 7 modes its network runs (Mask2Former: no batch decoder).
ARCHITECTURES = {"CropFormer": INFERENCE_MODES, "Mask2Former": ("image_o",)}
#: Our metric names (``lit_module`` logs ``<split>/<name>_<mode>``) -> the model-index
#: ``metric_type`` and the name the paper prints.
METRICS = {
    "ap": ("ap_e", "AP^e"),
    "ap50": ("ap_e50", "AP^e_50"),
    "ap75": ("ap_e75", "AP^e_75"),
}
#: The keys of :attr:`CardInfo.source` (a converted release model's Hub file).
SOURCE_KEYS = ("repo_id", "repo_type", "path", "revision", "etag")
#: The YAML header key that keeps the card's :class:`CardInfo`.
INFO_KEY = "entityseg"
TAGS = ("image-segmentation", "entity-segmentation", "pytorch", "safetensors")
HEADER_ORDER = ["library_name", "license", "tags", "pipeline_tag", "base_model", "datasets"]

RELEASE_REPO = "https://github.com/qqlu/Entity"
AUTHORS = (
    "Lu Qi",
    "Jason Kuen",
    "Tiancheng Shen",
    "Jiuxiang Gu",
    "Weidong Guo",
    "Jiaya Jia",
    "Zhe Lin",
    "Ming-Hsuan Yang",
)
BIBTEX = """@inproceedings{qi2023high,
  title={High Quality Entity Segmentation},
  author={Qi, Lu and Kuen, Jason and Shen, Tiancheng and Gu, Jiuxiang and Guo, Weidong and Jia, Jiaya and Lin, Zhe and Yang, Ming-Hsuan},
  booktitle={ICCV},
  year={2023}
}"""  # noqa: E501

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FLAT_KEY = re.compile(
    r"^(?:(?P<split>[^/]+)/)?(?P<metric>ap|ap50|ap75)_(?P<mode>" + "|".join(INFERENCE_MODES) + ")$"
)


def _package_version() -> str:
    import entityseg

    version = getattr(entityseg, "__version__", None)
    return version or importlib.metadata.version("entityseg")


@dataclass(frozen=True)
class CardInfo:
    """What a model card says about one model, checked once here.

    Attributes:
        name: the model's name (a zoo name such as ``cropformer_swin_tiny_3x``, a run's task
            name or a Hub repository id): the model-index name and the load snippet's argument.
        license: a Hub licence id; a converted release model keeps the release's
            ``cc-by-nc-4.0``.
        architecture: ``CropFormer`` or ``Mask2Former`` (the baseline without a batch decoder,
            so Image-O only).
        backbone: the timm name of the backbone.
        num_queries: the decoder's queries, the most entities per view.
        metrics: Table 7 mode -> {``ap``, ``ap50``, ``ap75``}: AP^e in percent, as our metrics
            are; stored as plain dicts in mode order.
        dataset: the data the metrics were measured on (and the model trained on, unless the
            recipe says otherwise), e.g. ``EntitySeg``; needed when there are metrics.
        datasets: Hub dataset ids for the header's ``datasets:`` field.
        base_model: what fine-tuning started from: a Hub id (also the header's
            ``base_model``) or a zoo name (told in the body only; the Hub takes ids only).
        recipe: the training recipe (experiment, steps, global batch, data, lr, ...): json
            values, nested mappings allowed.
        source: a converted release model's Hub file: ``repo_id``, ``repo_type``, ``path``,
            ``revision``, ``etag`` (``repo_id`` and ``path`` needed).
        entityseg_version: the entityseg version that made the model.
    """

    name: str
    license: str
    architecture: str
    backbone: str
    num_queries: int
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    dataset: str | None = None
    datasets: Sequence[str] = ()
    base_model: str | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)
    source: Mapping[str, Any] | None = None
    entityseg_version: str = field(default_factory=_package_version)

    def __post_init__(self) -> None:
        for key in ("name", "license", "backbone", "entityseg_version"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(key, getattr(self, key), "must be a non-empty string")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                "architecture", self.architecture, f"expected one of {list(ARCHITECTURES)}"
            )
        queries = self.num_queries
        if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
            raise ConfigError("num_queries", queries, "must be an integer >= 1")
        for key in ("dataset", "base_model"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(key, value, "must be a non-empty string or None")
        if isinstance(self.datasets, str) or not all(
            isinstance(d, str) and d for d in self.datasets
        ):
            raise ConfigError("datasets", self.datasets, "must be a list of Hub dataset ids")
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "metrics", self._checked_metrics())
        if self.metrics and self.dataset is None:
            raise ConfigError("dataset", None, "metrics need the name of the data they are on")
        object.__setattr__(self, "recipe", _plain(self.recipe, "recipe"))
        if self.source is not None:
            source = _plain(self.source, "source")
            unknown = sorted(set(source) - set(SOURCE_KEYS))
            if unknown or not source.get("repo_id") or not source.get("path"):
                raise ConfigError(
                    "source", source, f"expected repo_id and path, and only {list(SOURCE_KEYS)}"
                )
            object.__setattr__(self, "source", source)
            if self.license != RELEASE_LICENSE:
                raise ConfigError(
                    "license", self.license, f"a converted release model keeps {RELEASE_LICENSE}"
                )

    def _checked_metrics(self) -> dict[str, dict[str, float]]:
        runs = ARCHITECTURES[self.architecture]
        checked: dict[str, dict[str, float]] = {}
        for mode, values in self.metrics.items():
            if mode not in runs:
                raise ConfigError(
                    "metrics", mode, f"not a mode {self.architecture} runs; expected {list(runs)}"
                )
            for key, value in values.items():
                if key not in METRICS:
                    raise ConfigError(f"metrics.{mode}", key, f"expected one of {list(METRICS)}")
                if not _number(value) or not 0 <= value <= 100:
                    raise ConfigError(f"metrics.{mode}.{key}", value, "must be AP^e in [0, 100]")
        for mode in INFERENCE_MODES:
            values = self.metrics.get(mode) or {}
            if values:
                checked[mode] = {key: float(values[key]) for key in METRICS if key in values}
        return checked

    def to_dict(self) -> dict[str, Any]:
        """The info as json values, without the metrics (the card's ``entityseg:`` key)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["metrics"]
        values["datasets"] = list(self.datasets)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **changes: Any) -> CardInfo:
        """The info of a card's ``entityseg:`` key, with ``changes`` on top."""
        values = {**values, **changes}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(INFO_KEY, unknown, f"unknown card fields; expected some of {known}")
        return cls(**values)

    @property
    def is_release(self) -> bool:
        """Whether this is a converted release model (it has a :attr:`source`)."""
        return self.source is not None


def architecture_of(net_config: Mapping[str, Any]) -> str:
    """``CropFormer``, or ``Mask2Former`` for a network configuration without the association
    module (and so without the batch decoder)."""
    enabled = net_config.get("association", {}).get("enabled", True)
    return "CropFormer" if enabled else "Mask2Former"


def model_card(info: CardInfo) -> ModelCard:
    """The model card of ``info``: the Hub's YAML header (with the ``model-index`` when there
    are metrics) and the markdown body (see the module)."""
    tags = [*TAGS[:2], info.architecture.lower(), *TAGS[2:]]
    data = ModelCardData(
        library_name="entityseg",
        license=info.license,
        tags=tags,
        pipeline_tag="image-segmentation",
        base_model=info.base_model if _hub_id(info.base_model) else None,
        datasets=list(info.datasets) or None,
        model_name=info.name if info.metrics else None,
        eval_results=_eval_results(info) or None,
    )
    data[INFO_KEY] = info.to_dict()
    header = data.to_yaml(original_order=HEADER_ORDER)
    return ModelCard(f"---\n{header}\n---\n\n{_body(info)}")


def write_model_card(folder: str | Path, info: CardInfo) -> Path:
    """Write ``folder/README.md`` (through a temporary file and a rename); its path."""
    return _write(Path(folder) / "README.md", model_card(info))


def read_card_info(path: str | Path) -> CardInfo | None:
    """The :class:`CardInfo` a card keeps (a ``README.md``, or the folder holding it), its
    metrics included; None when there is no card or it is not an entityseg one."""
    try:
        card = _load(path)
    except UserError:
        return None
    stored = card.data.get(INFO_KEY)
    if not isinstance(stored, Mapping):
        return None
    return CardInfo.from_dict(stored, metrics=card_metrics(path))


def card_beside(checkpoint: str | Path | None) -> Path:
    """The model card of a checkpoint or a model folder's weights: ``README.md`` in its
    folder (training writes it beside the best checkpoint); one line when there is none."""
    if checkpoint is None:
        raise UserError("this model was not loaded from a file: it has no model card")
    path = Path(checkpoint).parent / "README.md"
    if not path.is_file():
        raise UserError(f"{path}: no model card beside {Path(checkpoint).name}")
    return path


def card_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """The AP^e of a card's ``model-index`` (a ``README.md``, or the folder holding it): mode ->
    {``ap``, ``ap50``, ``ap75``}; metrics that are not ours are skipped."""
    card = _load(path)
    metrics: dict[str, dict[str, float]] = {}
    by_type = {metric_type: key for key, (metric_type, _) in METRICS.items()}
    for result in card.data.eval_results or []:
        key, mode = by_type.get(result.metric_type), result.metric_config
        if key is not None and mode in PAPER_NAMES:
            metrics.setdefault(mode, {})[key] = float(result.metric_value)
    return {mode: metrics[mode] for mode in INFERENCE_MODES if mode in metrics}


def refresh_card_metrics(
    path: str | Path, metrics: Mapping[str, Mapping[str, float]], dataset: str | None = None
) -> Path:
    """Put the metrics of a new evaluation into an existing card (a ``README.md``, or the
    folder holding it) and write it back; its path.

    The card is rebuilt from the :class:`CardInfo` its header keeps, so licence, recipe,
    source and base model stay; header keys that :func:`model_card` does not write (added by
    hand, e.g. ``language``) stay too. Edits to the body are not kept. ``dataset``: the
    name of the data the new numbers are on, when it is not the card's.
    """
    path = _card_path(path)
    old = _load(path)
    stored = old.data.get(INFO_KEY)
    if not isinstance(stored, Mapping):
        raise UserError(f"{path}: not an entityseg model card (no {INFO_KEY}: key in its header)")
    changes = {"dataset": dataset} if dataset else {}
    card = model_card(CardInfo.from_dict(stored, metrics=metrics, **changes))
    for key, value in old.data.to_dict().items():
        if card.data.get(key) is None and key != "model-index":
            card.data[key] = value
    return _write(path, card)


def metrics_by_mode(
    metrics: Mapping[str, float | None], split: str | None = None
) -> dict[str, dict[str, float]]:
    """Flat metrics as training and ``evaluate`` log them (``val/ap_batch_oc``,
    ``test/ap75_image_o``; ``metrics.json``) grouped as mode -> {``ap``, ``ap50``, ``ap75``}.

    Other keys (losses, ``forward_ms``) are ignored, and NaN or ``null`` values (AP^e without
    ground-truth entities) dropped. ``split`` picks the prefix; None: ``test`` when logged (the
    number after training), else ``val``, else the only one there is.
    """
    found: dict[str, dict[str, dict[str, float]]] = {}
    for name, value in metrics.items():
        match = _FLAT_KEY.match(name)
        if match is None:
            continue
        by_mode = found.setdefault(match["split"] or "", {})
        if value is not None and not math.isnan(float(value)):
            by_mode.setdefault(match["mode"], {})[match["metric"]] = float(value)
    if split is None:
        splits = [s for s in ("test", "val") if s in found][:1] or sorted(found)
        if len(splits) > 1:
            raise UserError(f"metrics of several splits {splits}: choose one with split=")
        split = splits[0] if splits else ""
    grouped = found.get(split, {})
    return {
        mode: {key: grouped[mode][key] for key in METRICS if key in grouped[mode]}
        for mode in INFERENCE_MODES
        if grouped.get(mode)
    }


def _eval_results(info: CardInfo) -> list[EvalResult]:
    """One ``EvalResult`` per (mode, metric); the mode is the metric's ``config``."""
    dataset_type = re.sub(r"[^a-z0-9]+", "-", (info.dataset or "").lower()).strip("-")
    return [
        EvalResult(
            task_type="image-segmentation",
            task_name="Entity segmentation",
            dataset_type=dataset_type or "custom",
            dataset_name=info.dataset,
            metric_type=METRICS[key][0],
            metric_name=f"{METRICS[key][1]} ({PAPER_NAMES[mode]})",
            metric_config=mode,
            metric_value=value,
        )
        for mode, values in info.metrics.items()
        for key, value in values.items()
    ]


def _body(info: CardInfo) -> str:
    sections = [
        _intro(info),
        _results(info),
        _source(info) if info.is_release else _training(info),
        _usage(info),
        _limits(info),
        f"## Citation\n\n```bibtex\n{BIBTEX}\n```",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _intro(info: CardInfo) -> str:
    if info.architecture == "CropFormer":
        what = (
            "CropFormer segments the full image and high-resolution crops of it in one batch, "
            "and its batch decoder associates each entity's queries across the views, so that "
            "the fused masks keep the crops' detail."
        )
    else:
        what = (
            "This is the paper's single-scale Mask2Former baseline: the full image only, "
            "without CropFormer's crops and batch decoder."
        )
    facts = [
        ("architecture", info.architecture),
        ("backbone", f"`{info.backbone}`"),
        ("queries", str(info.num_queries)),
        ("licence", f"`{info.license}`"),
        ("entityseg", info.entityseg_version),
    ]
    if info.base_model:
        release = released_model(info.base_model)
        note = f" (a release model, {release.license})" if release else ""
        facts.insert(3, ("fine-tuned from", f"`{info.base_model}`{note}"))
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts)])
    return (
        f"# {info.name}\n\n"
        "Class-agnostic entity segmentation (Qi et al., *High Quality Entity Segmentation*, "
        "ICCV 2023): one mask for every thing and stuff region of an image, without a "
        f"category. {what}\n\n{table}"
    )


def _results(info: CardInfo) -> str:
    if not info.metrics:
        return ""
    names = " | ".join(name for _, name in METRICS.values())
    rows = [
        f"| {PAPER_NAMES[mode]} | "
        + " | ".join(f"{values[key]:.1f}" if key in values else "-" for key in METRICS)
        + " |"
        for mode, values in info.metrics.items()
    ]
    return (
        f"## Results\n\nAP^e (percent) on {info.dataset}, per inference mode of the paper's "
        f"Table 7:\n\n| Mode | {names} |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def _training(info: CardInfo) -> str:
    if not info.recipe:
        return ""
    rows = [f"| {key} | {_cell(value)} |" for key, value in _flatten(info.recipe)]
    data = f" on {info.dataset}" if info.dataset else ""
    return f"## Training\n\nTrained with entityseg{data}:\n\n| | |\n|---|---|\n" + "\n".join(rows)


def _source(info: CardInfo) -> str:
    source = info.source or {}
    kind = "datasets/" if source.get("repo_type") == "dataset" else ""
    revision = source.get("revision") or "main"
    url = f"https://huggingface.co/{kind}{source['repo_id']}/blob/{revision}/{source['path']}"
    pinned = [f"revision `{source['revision']}`"] if source.get("revision") else []
    pinned += [f"etag `{source['etag']}`"] if source.get("etag") else []
    pin = f" ({', '.join(pinned)})" if pinned else ""
    return (
        "## Source\n\n"
        f"Converted, tensor for tensor, from a checkpoint of the authors' release "
        f"([qqlu/Entity]({RELEASE_REPO}), `Entityv2`): [`{source['path']}`]({url}) in the "
        f"Hub repository `{source['repo_id']}`{pin}. The weights are the work of "
        f"{', '.join(AUTHORS[:-1])} and {AUTHORS[-1]}; like the release, they are licensed "
        "CC BY-NC 4.0: non-commercial use only, with credit to the authors."
    )


def _usage(info: CardInfo) -> str:
    return (
        "## Use\n\n"
        "```python\n"
        "from entityseg import EntitySegmenter\n\n"
        f'segmenter = EntitySegmenter.from_pretrained("{info.name}")\n'
        'entities = segmenter("photo.jpg")  # class-agnostic masks with scores\n'
        "```\n\n"
        "Or every image of a folder from the command line:\n\n"
        "```bash\n"
        "python -m entityseg.predict ckpt_path=<checkpoint> input=photos/\n"
        "```"
    )


def _limits(info: CardInfo) -> str:
    data = info.dataset or "the data of its recipe"
    speed = (
        "- Batch-OC (the default mode) takes about 2.4x the time of Image-O (the paper's "
        "Table 7); Image-O is the fast choice."
        if info.architecture == "CropFormer"
        else "- Image-O only: there is no batch decoder for the Batch modes."
    )
    return (
        "## Limits\n\n"
        "- Class-agnostic: entities carry a mask and a score, no category.\n"
        f"- Trained and evaluated on {data}; other kinds of images are untested.\n"
        f"- Test images are resized to {_test_sizes(info.recipe)}; other sizes are untested.\n"
        f"{speed}"
    )


def _test_sizes(recipe: Mapping[str, Any]) -> str:
    data = recipe.get("data") if isinstance(recipe.get("data"), Mapping) else {}
    short = recipe.get("test_short_size", data.get("test_short_size"))
    longest = recipe.get("test_max_size", data.get("test_max_size"))
    if short is None:
        return "the test sizes stored with the checkpoint (short side, max size, crops)"
    return f"a short side of {short}" + (f" (long side at most {longest})" if longest else "")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"`{text}`".replace("|", "\\|")


def _plain(value: Any, key: str) -> Any:
    """``value`` as YAML-safe json values (mappings -> dicts, sequences and tuples -> lists,
    paths -> strings), or :class:`ConfigError` naming ``key``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v, f"{key}[{n}]") for n, v in enumerate(value)]
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ConfigError(key, value, "must be a json value (string, number, list, mapping)")


def _number(value: Any) -> bool:
    """A finite real number (not a bool); numpy and torch scalars too."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and float(value) == value
    except (TypeError, ValueError):
        return False


def _hub_id(name: str | None) -> bool:
    """Whether ``name`` is a Hub repository id (``owner/name``), as the header's
    ``base_model`` must be; a zoo name is told in the body only."""
    return name is not None and _HUB_ID.match(name) is not None


def _card_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "README.md" if path.is_dir() else path


def _load(path: str | Path) -> ModelCard:
    path = _card_path(path)
    if not path.is_file():  # ModelCard.load would take the string for a Hub repository id
        raise UserError(f"{path}: no model card there")
    try:
        return ModelCard.load(path)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a model card ({str(err).splitlines()[0]})") from None


def _write(path: Path, card: ModelCard) -> Path:
    """``card`` to ``path`` through a temporary file and a rename: a reader (an upload) sees
    the old card or the new one, never half of one."""
    text = str(card)
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
