"""Callbacks that the training tests inject through the config (importable by subprocesses)."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class CrashAtStep(L.Callback):
    """Kill the run (an exception, as a pre-empted job would die) after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated kill at step {trainer.global_step}")


class DumpRankState(L.Callback):
    """Write each rank's weight hash and the val images its AP^e metric gathered."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metric = pl_module.metrics[f"val_{pl_module.modes[-1]}"]
        with metric.sync_context():
            gathered = sorted(
                set(torch.cat(metric.image_ids).tolist())
                if isinstance(metric.image_ids, list)
                else set(metric.image_ids.tolist())
            )
        local = sorted(set(torch.cat(metric.image_ids).tolist()))
        self._write(trainer, {"gathered": gathered, "local": local})

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
