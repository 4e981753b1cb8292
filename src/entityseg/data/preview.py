"""Run the data pipeline end to end and show what the network will see.

``python -m entityseg.data.preview [data=...] [data.crop_delta=0.6 ...]`` composes the training
config, validates it, generates the synthetic set if needed, draws a few training and validation
batches and writes ``views.png`` (every view with its entity masks, and the crop boxes on the
full view) to the run's output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table

from entityseg.config import CONFIG_DIR, exits_on_config_error, instantiate_checked
from entityseg.data.transforms import denormalize
from entityseg.viz import draw_boxes, overlay_masks

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    datamodule = instantiate_checked(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    train_batch = next(iter(datamodule.train_dataloader()))
    val_batch = next(iter(datamodule.val_dataloader()))
    Console().print(_shape_table({"train": train_batch, "val": val_batch}))
    out = Path(cfg.paths.output_dir) / "views.png"
    Image.fromarray(_views_picture(train_batch, cfg.data.pixel_mean, cfg.data.pixel_std)).save(out)
    log.info("wrote %s", out)


def _shape_table(batches: dict[str, dict]) -> Table:
    table = Table(title="CropFormer input batches")
    for column in ("split", "key", "value"):
        table.add_column(column)
    for split, batch in batches.items():
        for key, value in batch.items():
            if hasattr(value, "shape"):
                text = f"{value.dtype} {list(value.shape)}"
            elif key == "targets":
                view0 = value[0][0]
                text = (
                    f"{len(value)} images x {len(value[0])} views; image 0 view 0: "
                    f"masks {list(view0['masks'].shape)}, ids {list(view0['ids'].shape)}"
                )
            else:
                text = str(value)[:80]
            table.add_row(split, key, text)
    return table


def _views_picture(batch: dict, mean, std) -> np.ndarray:
    """One row per image: full view with the crop box, then each view with its targets."""
    rows = []
    for n, views in enumerate(batch["targets"]):
        h, w = batch["image_sizes"][n].tolist()
        full_h, full_w = batch["orig_sizes"][n].tolist()
        tiles = []
        for v, target in enumerate(views):
            image = denormalize(batch["images"][n, v, :, :h, :w], mean, std)
            tiles.append(overlay_masks(image, target["masks"][:, :h, :w].numpy()))
        scale = np.array([w / full_w, h / full_h, w / full_w, h / full_h])
        boxes = [b * scale for b in batch["crop_boxes"][n, 1:].numpy()]
        tiles.insert(0, draw_boxes(denormalize(batch["images"][n, 0, :, :h, :w], mean, std), boxes))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])


if __name__ == "__main__":
    main()
