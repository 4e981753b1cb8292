"""Shared fixtures: the real shared test data and a small generated synthetic set."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# No test reaches the real Hub or the user's Hub cache: huggingface_hub reads these when first
# imported (tests of the Hub code serve one on the loopback: tests/hub_server.py)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="entityseg-tests-hf-")
for _token in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_token, None)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


#: A CropFormer small enough for CPU tests: resnet10t, 32-wide decoders, 2 heads.
TINY_NET = dict(
    backbone=dict(name="resnet10t", pretrained=False),
    pixel_decoder=dict(
        conv_dim=32, mask_dim=32, num_layers=1, num_heads=2, num_points=2, ffn_dim=64
    ),
    decoder=dict(hidden_dim=32, num_queries=8, num_heads=2, ffn_dim=64, num_layers=3),
    association=dict(enabled=True, share_decoder=True, num_heads=2, ffn_dim=64),
)


def tiny_model(num_queries: int = 8, **association):
    """The :data:`TINY_NET` CropFormer, seeded with 0; ``association`` overrides its switches."""
    from entityseg.models.cropformer import CropFormer

    config = copy.deepcopy(TINY_NET)
    config["decoder"]["num_queries"] = num_queries
    config["association"].update(association)
    torch.manual_seed(0)
    return CropFormer(**config)


#: Small test views (the ``data`` config's test keys) for :func:`write_tiny_checkpoint`.
TINY_VIEWS = {
    "test_short_size": 96,
    "test_max_size": 160,
    "size_scale": 1.0,
    "crop_delta": 0.7,
    "test_crop_layout": "fixed4",
    "test_crop_resize": "same",
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}


def write_tiny_checkpoint(path: Path, views: dict = TINY_VIEWS) -> Path:
    """A :func:`tiny_model` checkpoint as training writes one (weights, network config and the
    test views ``views``: the ``data`` config's test keys). Returns ``path``."""
    from entityseg.models.checkpoint import NET_CONFIG_KEY, VIEWS_KEY

    net = tiny_model()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, NET_CONFIG_KEY: net.config, VIEWS_KEY: views}, path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real COCO photos and the release's reference outputs), read-only."""
    if not SHARED_DATA.is_dir():
        message = f"shared test data not found at {SHARED_DATA}"
        if os.environ.get("CI"):  # CI must prove release equivalence, never skip it
            pytest.fail(message + " (CI is set: the release-equivalence tests need it)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> Path:
    """Four 256 x 192 synthetic scenes: ``DIR/annotations.json`` + ``DIR/images``."""
    from entityseg.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, num_images=4, seed=0, height=192, width=256)
    return out


@pytest.fixture()
def coco_sample(shared_data, tmp_path) -> Path:
    """A writable copy of the two COCO panoptic photos and their annotations."""
    dst = tmp_path / "coco_panoptic_sample"
    shutil.copytree(shared_data / "coco_panoptic_sample", dst)
    return dst


#: The photos of :func:`write_awkward_photos`.
PHOTOS = ["deep.png", "grey.png", "palette.png", "rgb.jpg", "rgba.png", "rotated.jpg"]


def write_awkward_photos(folder: Path) -> Path:
    """:data:`PHOTOS` in ``folder``: synthetic scenes of different sizes in awkward encodings
    (16-bit, greyscale, palette, RGBA, EXIF-rotated JPEG). Returns ``folder``."""
    import numpy as np
    from PIL import Image

    from entityseg.data.synthetic import generate_dataset

    generate_dataset(folder / "scenes", num_images=2, seed=3, height=96, width=128)
    first, second = sorted((folder / "scenes/images").glob("*.jpg"))
    scene = Image.open(first).convert("RGB")
    other = Image.open(second).convert("RGB").crop((0, 0, 112, 80))
    scene.save(folder / "rgb.jpg", quality=95)
    other.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = other.resize((100, 90))
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    scene.convert("L").save(folder / "grey.png")
    deep = np.asarray(other.convert("L"), dtype=np.uint16) * 257  # 16-bit, full range
    Image.fromarray(deep).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    scene.save(folder / "rotated.jpg", exif=exif, quality=95)
    return folder


def make_datamodule(root: Path, **kwargs):
    """An ``EntityDataModule`` on ``root/annotations.json`` + ``root/images`` for train and val
    (no workers, network sizes x 0.25 unless ``kwargs`` say otherwise)."""
    from entityseg.data.datamodule import EntityDataModule

    args = dict(
        train_json=str(root / "annotations.json"),
        train_images=str(root / "images"),
        val_json=str(root / "annotations.json"),
        val_images=str(root / "images"),
        num_workers=0,
        size_scale=0.25,
    )
    return EntityDataModule(**{**args, **kwargs})


def run_python(*args, timeout: float = 600, env: dict | None = None):
    """``python ARGS...`` (e.g. ``"-m", "entityseg.train", overrides...``) from the repo root.

    Returns the ``CompletedProcess`` with its stdout and stderr as text.
    """
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


class Background:
    """``python ARGS...`` from the repo root, started now and left to run, its stdout and stderr
    written to ``folder``: a long single-threaded command whose result a module needs late runs
    on another core while the module's first tests run. :meth:`result` waits for it.
    """

    def __init__(self, *args, folder: Path, timeout: float = 600) -> None:
        self.folder, self.timeout, self.started = folder, timeout, time.monotonic()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
            command = [sys.executable, *map(str, args)]
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)

    def result(self) -> subprocess.CompletedProcess:
        """Waits until the command ends (killed ``timeout`` s after its start, as
        :func:`run_python`'s are) and returns what :func:`run_python` would."""
        try:
            self.process.wait(timeout=max(0.0, self.started + self.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        stdout, stderr = ((self.folder / name).read_text() for name in ("stdout.txt", "stderr.txt"))
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, stdout, stderr
        )

    def stop(self) -> None:
        """Kills the command if it still runs (the tests that needed it did not wait)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def selected_in_module(request, fixture: str) -> bool:
    """Whether a selected test of the requesting fixture's module uses ``fixture``: a module
    fixture starts a :class:`Background` command only when a test will wait for it."""
    items = [item for item in request.session.items if item.path == request.path]
    return any(fixture in item.fixturenames for item in items)


def cli_config(name: str, output_dir: Path, *overrides: str):
    """The config a command line composes (``name``: ``predict``, ``eval``, ``train``, ...)
    with ``overrides``, for calling its ``main(cfg)`` in this process: quicker than a new
    Python, and Hydra passes the config straight through. ``output_dir`` stands for the run
    folder Hydra would make."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def collected_table(multirun: Path) -> list[str]:
    """Run ``scripts/collect_tables.py`` on a multirun folder: the lines of its table.md."""
    result = run_python(
        "scripts/collect_tables.py",
        str(multirun),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return (multirun / "table.md").read_text().splitlines()


def pycocotools_ap(gt_json: Path, predictions: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75 (x100) of COCO results by pycocotools alone, the independent reference
    for our AP^e: every ground truth and prediction in one category, areas from the masks."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = json.loads(Path(gt_json).read_text())
    for annotation in data["annotations"]:
        annotation["category_id"] = 1
    data["categories"] = [{"id": 1, "name": "entity"}]
    ground_truth = COCO()
    ground_truth.dataset = data
    ground_truth.createIndex()
    results = [{**p, "category_id": 1} for p in predictions]
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {key: 100 * evaluator.stats[i] for i, key in enumerate(("AP", "AP50", "AP75"))}
