"""``make demo`` (``entityseg.demo``) end to end on a one-step run: it trains, evaluates the
trained model and the same model untrained in every Table 7 mode, writes both tables, their
predictions and a picture per validation image, and prints the tables and the AP^e_50 change."""

import json

from conftest import cli_config
from entityseg import demo
from entityseg.hub.card import read_card_info
from test_train import TINY_RUN

MODES = ["image_o", "batch_o", "batch_c", "batch_oc"]


def test_demo_trains_evaluates_both_models_and_draws_them(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = cli_config(
        "train", out, *TINY_RUN, f"paths.data_dir={tmp_path}/data", "trainer.max_steps=1"
    )
    assert list(cfg.inference.modes) == MODES  # what the demo evaluates: every mode
    demo.main(cfg)
    for model in ("trained", "untrained"):
        rows = json.loads((out / model / "table7.json").read_text())
        assert [row["mode"] for row in rows] == MODES
        for row in rows:
            assert (out / model / row["predictions"]).is_file()
        assert (out / model / "table7.md").read_text().startswith("| Decoder | AP^e |")
    validation = sorted(p.stem for p in (tmp_path / "data/synthetic/val/images").iterdir())
    assert sorted(p.stem for p in (out / "pictures").glob("*.jpg")) == validation
    # the model card training wrote beside its best checkpoint: the run's last evaluation
    (card,) = (out / "checkpoints").glob("README.md")
    rows = json.loads((out / "trained/table7.json").read_text())
    card_info = read_card_info(card)
    assert card_info.metrics == {  # the demo's own evaluation of the trained model
        row["mode"]: {"ap": row["AP"], "ap50": row["AP50"], "ap75": row["AP75"]} for row in rows
    }
    assert card_info.recipe["experiment"] == "demo" and card_info.dataset == "synthetic"
    printed = capsys.readouterr().out
    assert "Trained (" in printed and "Untrained (same initialisation):" in printed
    # what the model is (not one for real photos), where a user first meets it
    assert "on real photos it finds colour and texture blobs" in printed
    assert "ckpt_path=cropformer_hornet_3x" in printed
    assert [line.split(":")[0] for line in printed.splitlines() if "untrained ->" in line] == [
        f"AP^e_50 {mode}" for mode in MODES
    ]
