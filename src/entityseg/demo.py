"""The whole library on a laptop CPU: ``make demo`` (``python -m entityseg.demo experiment=demo``).

Generates the synthetic set, trains the ``demo`` experiment, then evaluates the trained model
and the same model untrained with every Table 7 mode: writes the predictions jsons, the two
tables and pictures of Image-O beside Batch-OC with the crops drawn, and prints the tables, the
AP^e_50 gain from training and how to open the TensorBoard log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig
from PIL import Image

from entityseg.api import EntitySegmenter
from entityseg.config import CONFIG_DIR, exits_on_config_error, instantiate_checked
from entityseg.data.coco_entity import read_rgb_image
from entityseg.evaluation.entity_ap import metrics_json
from entityseg.evaluation.table7 import (
    flat_metrics,
    markdown_table,
    mode_predictions,
    table_rows,
)
from entityseg.hub.card import card_beside, metrics_by_mode, refresh_card_metrics
from entityseg.inference.settings import InferenceSettings
from entityseg.training import train
from entityseg.viz import compare_modes

log = logging.getLogger(__name__)

#: What the demo's model is, said where a user first meets it.
DEMO_MODEL_NOTE = (
    "This model is a tiny network trained for a few minutes on synthetic scenes: on real photos "
    "it finds colour and texture blobs, not entities. For real photos use a released model: "
    "ckpt_path=cropformer_hornet_3x, or EntitySegmenter.from_pretrained('cropformer_hornet_3x') "
    "(docs/model-zoo.md)."
)


def evaluate_net(
    segmenter: EntitySegmenter, datamodule, out_dir: Path, name: str
) -> tuple[list, dict]:
    """Table 7 rows of ``segmenter`` on the validation set, predictions written to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = segmenter.run(
        datamodule.val_dataloader(),
        segmenter.settings.modes,
        description=f"evaluating the {name} model",
    )
    rows = table_rows(*mode_predictions(results), datamodule.hparams.val_json, out_dir)
    (out_dir / "table7.md").write_text(markdown_table(rows))
    (out_dir / "table7.json").write_text(metrics_json(rows, indent=2))
    return rows, results


def save_pictures(results, datamodule, out_dir: Path) -> None:
    """Image-O beside Batch-OC (with the crops drawn) for every validation image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for record in datamodule.datasets["val"].records:
        image = read_rgb_image(record.path)
        per_mode = {m: results[m].entities[record.image_id] for m in ("image_o", "batch_oc")}
        panel = compare_modes(image, per_mode, per_mode["batch_oc"].crop_boxes.tolist())
        Image.fromarray(panel).save(out_dir / f"{record.path.stem}.jpg", quality=90)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    metrics, best = train(cfg)
    out = Path(cfg.paths.output_dir)
    settings = InferenceSettings.from_config(cfg.inference, device="cpu")
    trained = EntitySegmenter.from_checkpoint(best, settings)
    L.seed_everything(cfg.seed)
    untrained = EntitySegmenter(  # the same initialisation, run the same way
        instantiate_checked(cfg.model.net, "model.net"), trained.views, trained.settings
    )
    datamodule = instantiate_checked(cfg.data, "data", **trained.views.to_keys())
    datamodule.setup("validate")
    trained_rows, results = evaluate_net(trained, datamodule, out / "trained", "trained")
    # the model card training wrote beside the checkpoint: this evaluation's AP^e
    refresh_card_metrics(card_beside(best), metrics_by_mode(flat_metrics(trained_rows, "val")))
    untrained_rows, _ = evaluate_net(untrained, datamodule, out / "untrained", "untrained")
    save_pictures(results, datamodule, out / "pictures")

    print(f"\nTrained ({Path(best).name}), validation set:\n{markdown_table(trained_rows)}")
    print(f"Untrained (same initialisation):\n{markdown_table(untrained_rows)}")
    for trained_row, untrained_row in zip(trained_rows, untrained_rows, strict=True):
        mode, after, before = trained_row["mode"], trained_row["AP50"], untrained_row["AP50"]
        ratio = after / before if before > 0 else float("inf") if after > 0 else float("nan")
        print(f"AP^e_50 {mode}: {before:.1f} untrained -> {after:.1f} trained ({ratio:.1f}x)")
    print(
        f"\nPictures: {out / 'pictures'}\nTensorBoard: .venv/bin/tensorboard --logdir "
        f"{out / 'tensorboard'}\n"
    )
    print(DEMO_MODEL_NOTE)


if __name__ == "__main__":
    main()
