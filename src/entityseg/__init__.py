"""entityseg: CropFormer fine-grained entity segmentation (Lightning + Hydra).

``from entityseg import EntitySegmenter``: entity masks of any image from a checkpoint
(:mod:`entityseg.api`), returned as :class:`Entities`, run as :class:`InferenceSettings` say;
``coco_json`` makes a whole COCO json of many images' entities.
They are imported on first use, so that ``import entityseg.<module>`` (a data tool, the AP^e
scorer) does not load the network code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from entityseg.api import EntitySegmenter
    from entityseg.inference.fusion import Entities
    from entityseg.inference.settings import InferenceSettings
    from entityseg.inference.writing import coco_json
    from entityseg.models.checkpoint import CheckpointError

__all__ = ["CheckpointError", "Entities", "EntitySegmenter", "InferenceSettings", "coco_json"]
__version__ = "0.1.0"

_PUBLIC = {
    "EntitySegmenter": "entityseg.api",
    "Entities": "entityseg.inference.fusion",
    "InferenceSettings": "entityseg.inference.settings",
    "CheckpointError": "entityseg.models.checkpoint",
    "coco_json": "entityseg.inference.writing",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'entityseg' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
