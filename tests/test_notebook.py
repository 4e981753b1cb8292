"""The notebook runs top to bottom on the CPU (it trains a tiny model for a minute), on a folder
of photos as its ``IMAGES`` promises."""

import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO


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
