"""The notebook runs top to bottom on the CPU, training its tiny model and then segmenting a
folder of photos as its ``IMAGES`` promises.

Its ``TRAIN_STEPS`` (about a minute of training for a reader) is set to :data:`TRAIN_STEPS` here:
every cell, the training cell included, still runs, and the test asserts nothing about what the
model learned (its own 60 steps found 0 or 1 entity per photo and mode, measured once: nor did
the test then). Drawing entities is tested with real masks in tests/test_viz.py.
"""

import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO

#: Training steps of the notebook's model here (its own default trains for about a minute).
TRAIN_STEPS = 2


@pytest.mark.slow
def test_visualize_entities_notebook_runs(tmp_path, synthetic_set):
    path = REPO / "notebooks/visualize_entities.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells)  # committed without outputs
    photos = tmp_path / "photos"  # "your photos": a JPEG and a greyscale PNG of other sizes
    photos.mkdir()
    first, second = sorted((synthetic_set / "images").glob("*.jpg"))[:2]
    shutil.copy(first, photos / "scene.jpg")
    grey = Image.open(second).convert("L").resize((150, 100))
    grey.save(photos / "grey.png")
    setup = notebook.cells[1]
    assert "IMAGES = None" in setup.source
    setup.source = setup.source.replace("IMAGES = None", f"IMAGES = {str(photos)!r}")
    setup.source, found = re.subn(
        r"^TRAIN_STEPS = \d+", f"TRAIN_STEPS = {TRAIN_STEPS}", setup.source, flags=re.M
    )
    assert found == 1
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) == 3  # the two photos and the size plot
    counts = next(  # the entities per photo and mode, the segmenting cell's result
        o["data"]["text/plain"]
        for o in notebook.cells[3].outputs
        if "text/plain" in o.get("data", {})
    )
    assert "'scene.jpg'" in counts and "'grey.png'" in counts
    trained = "".join(o.get("text", "") for o in notebook.cells[2].outputs)
    assert f"trained {TRAIN_STEPS} steps" in trained  # the training cell trained the model
