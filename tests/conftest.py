"""Shared fixtures: the real shared test data and a small generated synthetic set."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real COCO photos and the release's reference outputs), read-only."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
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


def collected_table(multirun: Path) -> list[str]:
    """Run ``scripts/collect_tables.py`` on a multirun folder: the lines of its table.md."""
    result = subprocess.run(
        [sys.executable, "scripts/collect_tables.py", str(multirun)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return (multirun / "table.md").read_text().splitlines()
