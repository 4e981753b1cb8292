"""Callbacks that the training tests inject through the config (importable by subprocesses)."""

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import pycocotools.mask as mask_utils

from entityseg.evaluation.entity_ap import EntityAP


class CrashAtStep(L.Callback):
    """Kill the run (an exception, as a pre-empted job would die) after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated kill at step {trainer.global_step}")


class DumpRankState(L.Callback):
    """Write each rank's weight hash, its validation images, and those its AP^e metric gathered."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.local: set[int] = set()
        self.gathered: list[int] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.local = set()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.local.update(batch["image_ids"].tolist())
        if batch_idx == trainer.num_val_batches[0] - 1:  # every rank is here: gather now
            # the module's metric holds predictions (none, for an untrained model); a twin fed
            # one whole-image prediction per image seen here shows what the gather brings
            metric = pl_module.metrics[f"val_{pl_module.modes[-1]}"]
            twin = EntityAP(metric.gt_json_path).to(pl_module.device)
            twin.update([_whole_image(i, metric.gt_json_path) for i in sorted(self.local)])
            with twin.sync_context(should_sync=True):
                states = twin._concatenated_states()
            self.gathered = sorted(set(states["image_ids"].tolist()))

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer, {"gathered": self.gathered, "local": sorted(self.local)})

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for value in pl_module.net.state_dict().values():
            digest.update(value.detach().cpu().numpy().tobytes())
        self._write(trainer, {"weights": digest.hexdigest()})

    def _write(self, trainer, data: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **data}))


def _whole_image(image_id: int, gt_json: Path) -> dict:
    """A prediction covering the whole image ``image_id`` of a COCO json."""
    image = next(i for i in json.loads(Path(gt_json).read_text())["images"] if i["id"] == image_id)
    rle = mask_utils.encode(np.ones((image["height"], image["width"]), np.uint8, order="F"))
    rle["counts"] = rle["counts"].decode()
    return {"image_id": image_id, "segmentation": rle, "score": 1.0}
