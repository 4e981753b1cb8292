"""The released entity-segmentation models (qqlu/Entity, ``Entityv2``), by the release's names.

>>> from entityseg import EntitySegmenter, zoo
>>> [model.name for model in zoo.MODELS]  # cropformer_swin_tiny_3x, ...
>>> segmenter = EntitySegmenter.from_pretrained("cropformer_hornet_3x")

The release keeps its checkpoints in the Hugging Face *dataset* repository
:data:`REPO_ID` (gated: accept its conditions on the repository's page, then log in), one
folder per model under :data:`FOLDER`, file names carrying a hash suffix
(``CropFormer_hornet_3x_03823a.pth``) that :mod:`entityseg.hub.release` finds through the
Hub's file listing. Each model is converted with the network and test settings of the
entityseg experiment that equals its release config (``experiment``). AP^e is the release's
(its README), on EntitySeg's low- and high-resolution validation images.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The Hub repository of the release's checkpoints (a dataset repository, not a model one).
REPO_ID = "qqlu1992/Adobe_EntitySeg"
REPO_TYPE = "dataset"
#: The folder of the entity-segmentation models in :data:`REPO_ID`.
FOLDER = "CropFormer_model/Entity_Segmentation"
#: The release's starting weights (``init_from_release``) are looked for in this folder.
PRETRAINED_FOLDER = f"{FOLDER}/COCO_Pretrained_Weights"
#: The released models' licence (the release's README), kept by every converted copy.
LICENSE = "cc-by-nc-4.0"


@dataclass(frozen=True)
class ReleasedModel:
    """One released model: where it lies on the Hub and which experiment builds its network."""

    name: str  #: the release config's name, e.g. ``cropformer_swin_tiny_3x``
    folder: str  #: its folder under :data:`FOLDER`
    experiment: str  #: the ``conf/experiment`` whose network and test views equal its config
    architecture: str  #: ``CropFormer`` or ``Mask2Former`` (image-level decoder only)
    backbone: str
    queries: int
    ap_low: float  #: AP^e on the low-resolution validation images (the release's README)
    ap_high: float  #: AP^e on the high-resolution validation images
    license: str = LICENSE

    @property
    def path(self) -> str:
        """The model's folder in :data:`REPO_ID`."""
        return f"{FOLDER}/{self.folder}"


MODELS: tuple[ReleasedModel, ...] = (
    ReleasedModel(
        "mask2former_swin_tiny_3x", "Mask2Former_swin_tiny_3x", "mask2former_swint",
        "Mask2Former", "Swin-T", 100, 38.8, 40.7,
    ),
    ReleasedModel(
        "cropformer_swin_tiny_3x", "CropFormer_swin_tiny_3x", "cropformer_swint",
        "CropFormer", "Swin-T", 100, 40.6, 43.0,
    ),
    ReleasedModel(
        "mask2former_swin_large_3x", "Mask2Former_swin_large_w7_3x", "mask2former_swinl",
        "Mask2Former", "Swin-L (w7)", 100, 44.4, 46.2,
    ),
    ReleasedModel(
        "cropformer_swin_large_3x", "CropFormer_swin_large_w7_3x", "cropformer_swinl",
        "CropFormer", "Swin-L (w7)", 100, 45.8, 48.2,
    ),
    ReleasedModel(
        "mask2former_hornet_3x", "Mask2Former_hornet_3x", "mask2former_hornet_l",
        "Mask2Former", "HorNet-L GF", 200, 47.1, 49.2,
    ),
    ReleasedModel(
        "cropformer_hornet_3x", "CropFormer_hornet_3x", "cropformer_hornet_l",
        "CropFormer", "HorNet-L GF", 200, 49.1, 51.5,
    ),
)  # fmt: skip

NAMES: tuple[str, ...] = tuple(model.name for model in MODELS)


def released_model(name: str) -> ReleasedModel | None:
    """The released model called ``name``, or None."""
    return next((model for model in MODELS if model.name == name), None)


def markdown_table() -> str:
    """The zoo as a markdown table (the docs' model-zoo page shows the same rows)."""
    rows = [
        "| name | experiment | architecture | backbone | queries | AP^e low-res | AP^e high-res "
        "| licence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{m.name}` | `{m.experiment}` | {m.architecture} | {m.backbone} | {m.queries} "
        f"| {m.ap_low} | {m.ap_high} | {m.license} |"
        for m in MODELS
    ]
    return "\n".join(rows)
