"""AP^e logging of the LightningModule: a NaN (nothing to score) stays NaN and is explained."""

import logging
import math

from torch import nn

from conftest import tiny_model
from entityseg.lit_module import CropFormerModule
from entityseg.losses.criterion import CropFormerCriterion


class NanMetric(nn.Module):
    """What ``EntityAP.compute`` gives for a json without ground-truth entities."""

    def compute(self) -> dict:
        return {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}

    def reset(self) -> None:
        pass


def test_nan_ap_is_logged_as_nan_and_warned_once(caplog):
    module = CropFormerModule(
        tiny_model(),
        CropFormerCriterion(num_points=64),
        {"lr": 1e-4, "weight_decay": 0.05, "backbone_lr_factor": 0.1},
        {"power": 0.9},
        {"modes": ["image_o"], "max_entities": 100, "overlapping": False, "query_chunk": 16},
    )
    module.metrics = nn.ModuleDict({"val_image_o": NanMetric()})
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, value)
    with caplog.at_level(logging.WARNING, logger="entityseg.lit_module"):
        module._log_ap("val")
        module._log_ap("val")
    assert set(logged) == {"val/ap_image_o", "val/ap50_image_o", "val/ap75_image_o"}
    assert all(math.isnan(v) for v in logged.values())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3  # one per metric, not one per validation
    assert "val/ap_image_o is NaN: the val json has no ground-truth entity" in warnings[0]
