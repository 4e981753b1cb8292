"""The web demo end to end in a real browser: ``python -m entityseg.app`` started as a user
starts it, and Debian's ``chromium`` (headless, driven by Playwright; nothing is downloaded)
uploading a photo and reading the page.

``.ci/run`` installs ``chromium`` where it is missing, so these tests never skip in CI. The
screenshot is saved in the test's temporary folder; ``ENTITYSEG_APP_SCREENSHOT=<png>`` copies it
there too, and ``ENTITYSEG_APP_CKPT=<ckpt>`` serves that checkpoint instead of a tiny untrained
one and ``ENTITYSEG_APP_PHOTO=<image>`` uploads that image (how the README's screenshot was
made).
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_awkward_photos, write_tiny_checkpoint
from entityseg.api import EntitySegmenter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Headless, and nothing that reaches for Google's servers (this machine has no internet).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
COMPARE = "Image-O beside Batch-OC (what the crops recover)"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(tmp_path: Path, *overrides: str):
    """``python -m entityseg.app`` on a free port with ``overrides``: its url once it answers."""
    port = free_port()
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 (closed below, after the process)
    command = [sys.executable, "-m", "entityseg.app", f"app.port={port}", *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app stopped: {(tmp_path / 'app.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the app did not answer within 180 s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_upload_and_segment_batch_oc_in_chromium(browser, tmp_path):
    photos = write_awkward_photos(tmp_path / "photos")
    checkpoint = os.environ.get("ENTITYSEG_APP_CKPT") or write_tiny_checkpoint(
        tmp_path / "tiny.ckpt"
    )
    # EXIF-rotated: the page must read it as predict does
    photo = Path(os.environ.get("ENTITYSEG_APP_PHOTO") or photos / "rotated.jpg")
    entities = EntitySegmenter.from_checkpoint(checkpoint, device="cpu")(photo, "batch_oc")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    overrides = [
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={tmp_path}/run",
        f"paths.data_dir={tmp_path}/data",  # the example scenes are generated here
        "data.synthetic.num_val=2",
        "data.synthetic.height=96",
        "data.synthetic.width=128",
    ]
    with running_app(tmp_path, *overrides) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("synthetic_000001.jpg").wait_for()  # the examples, made on first use
        upload = page.locator("#upload input[type=file]")
        upload.set_input_files(str(photo))
        page.get_by_label("Batch-OC", exact=True).check()
        page.get_by_label(COMPARE).check()
        page.locator("#run").click()
        page.wait_for_function(
            "document.querySelector('#overlay img')?.naturalWidth > 0", timeout=120_000
        )
        summary = page.locator("#summary")
        summary.get_by_text("entities").wait_for()
        assert summary.inner_text().startswith(f"{len(entities)} entities (Batch-OC) in ")
        assert "Image-O finds" in summary.inner_text()
        page.wait_for_function("document.querySelector('#comparison img')?.naturalWidth > 0")
        links = {
            name: page.locator(f"#downloads a[download='{photo.stem}{name}']").get_attribute("href")
            for name in ("_entities.png", "_overlay.jpg", "_predictions.json")
        }
        with urllib.request.urlopen(links["_entities.png"], timeout=30) as response:
            id_map = np.asarray(Image.open(io.BytesIO(response.read())))
        assert np.array_equal(id_map, entities.to_id_map())  # the download, as a user gets it
        shot = tmp_path / "app.png"
        page.screenshot(path=shot, full_page=True)

        page.locator("#upload button[aria-label='Clear']").click()
        upload.set_input_files(str(bad))
        page.locator("#run").click()
        page.get_by_text("notes.jpg: not an image file").first.wait_for(timeout=60_000)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ENTITYSEG_APP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ENTITYSEG_APP_SCREENSHOT"])


def test_without_a_checkpoint_the_page_says_how_to_get_one(browser, tmp_path):
    overrides = [f"hydra.run.dir={tmp_path}/run", f"paths.log_dir={tmp_path}/outputs"]
    with running_app(tmp_path, *overrides) as url:
        page = browser.new_page()
        page.goto(url)
        page.get_by_text("No checkpoint given").wait_for()
        assert "make demo" in page.locator("#summary").inner_text()
