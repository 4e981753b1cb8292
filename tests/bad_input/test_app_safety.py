"""The web demo on untrusted files and an untrusted network (issue #21).

Uploads reach only the Pillow plugins of the formats entityseg reads (a PostScript file named
``photo.jpg`` never reaches Ghostscript); Gradio's file route serves the example files and
nothing else of their folder or of the disk; ``app.auth`` puts the page behind a login, checked
at start in one line that never holds a password; a page served beyond this machine without
one logs one warning. The server is started once, on 127.0.0.1, for the HTTP checks.
"""

import logging
from pathlib import Path

import httpx
import pytest
from crafted import eps_with_tiff_preview, png_claiming, postscript
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from omegaconf import OmegaConf
from PIL import Image

from conftest import run_python, write_tiny_checkpoint
from entityseg.api import EntitySegmenter
from entityseg.app.__main__ import (
    auth_users,
    check_app_settings,
    example_images,
    serve,
    warn_if_open_to_the_network,
)
from entityseg.app.page import build_page
from entityseg.app.service import SegmentationService, UploadError, read_upload
from entityseg.config import ConfigError
from entityseg.data.coco_entity import IMAGE_SUFFIXES

PASSWORD = "s3cret-Pa55"
APP = dict(
    host="127.0.0.1",
    port=0,
    max_megapixels=50,
    max_file_mb=5,
    examples=1,
    keep_results=4,
    display_side=64,
    auth=None,
)
NOT_AN_IMAGE = "not an image file (entityseg reads JPEG, PNG, BMP, TIFF, WEBP, GIF)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory) -> SegmentationService:
    segmenter = EntitySegmenter.from_checkpoint(checkpoint, device="cpu")
    return SegmentationService(segmenter, tmp_path_factory.mktemp("results"), max_megapixels=50)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory) -> Path:
    """An example folder: ``a.png`` is the example, the rest is not."""
    folder = tmp_path_factory.mktemp("val")
    Image.new("RGB", (32, 24), "red").save(folder / "a.png")
    Image.new("RGB", (32, 24), "blue").save(folder / "b.png")
    (folder / "secret.txt").write_text("not for the page")
    (folder / "annotations.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def served(service, val_folder):
    """The page with example ``a.png``, behind the login ``alice``: its url."""
    page = build_page(service, [val_folder / "a.png"], "tiny test network")
    app = OmegaConf.create({**APP, "auth": [f"alice:{PASSWORD}"]})
    _, url, _ = serve(page, app, [val_folder / "a.png"], service.workdir, block=False)
    yield url
    page.close()


def upload_error(service: SegmentationService, path: Path) -> str:
    with pytest.raises(UploadError) as caught:
        service.segment(path, service.defaults)
    return str(caught.value)


# -- uploads -------------------------------------------------------------------------------


def test_postscript_never_reaches_pillows_eps_plugin(service, tmp_path, monkeypatch):
    """A PostScript ``photo.jpg`` and an EPS with a TIFF preview named ``scan.tif``: Pillow's
    EPS plugin (which hands the file to Ghostscript where it is installed) is never asked."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "marker"
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(postscript(marker))
    scan = tmp_path / "scan.tif"
    scan.write_bytes(eps_with_tiff_preview(marker))
    for path in (photo, scan):
        with Image.open(path) as img:  # what all of Pillow makes of them
            assert img.format == "EPS"
    asked = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: asked.append(self))
    assert upload_error(service, photo) == f"photo.jpg: {NOT_AN_IMAGE}"
    assert upload_error(service, scan) == f"scan.tif: {NOT_AN_IMAGE}"
    assert asked == [] and not marker.exists()


def test_pixel_counts_are_refused_from_the_header(service, tmp_path):
    """The headers' sizes are refused before decoding: the pixels are not there."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(20000, 20000))
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert upload_error(service, huge) == (
        f"huge.png: refused as a decompression bomb (Image size (400000000 pixels) exceeds "
        f"limit of {limit} pixels, could be decompression bomb DOS attack.)"
    )
    large = tmp_path / "large.png"
    large.write_bytes(png_claiming(10000, 8000))
    assert upload_error(service, large) == (
        "large.png: 10000x8000 is 80 megapixels, above this demo's limit of 50 (app.max_megapixels)"
    )


def test_empty_and_truncated_uploads(service, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert upload_error(service, empty) == "empty.png: image file is empty (0 bytes)"
    full = tmp_path / "full.jpg"
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:400])  # the size is there, the pixels are not
    assert upload_error(service, truncated) == "truncated.jpg: corrupt image (Truncated File Read)"
    with pytest.raises(UploadError, match="^empty.png: image file is empty"):
        read_upload(empty, 50)


def test_the_page_takes_image_suffixes_only(served, service, tmp_path):
    """The browser's file picker offers these suffixes; Gradio checks them when the button's
    request arrives; read_upload checks what the file holds."""
    (upload,) = [
        c["props"]
        for c in build_page(service).config["components"]
        if c["props"].get("elem_id") == "upload"
    ]
    assert upload["file_types"] == list(IMAGE_SUFFIXES)
    client = Client(served, auth=("alice", PASSWORD), verbose=False)
    (tmp_path / "photo.ps").write_bytes(postscript(tmp_path / "marker"))
    (tmp_path / "photo.jpg").write_bytes(postscript(tmp_path / "marker"))
    expected = {
        "photo.ps": "Invalid file type. Please upload a file that is one of these formats: "
        f"{list(IMAGE_SUFFIXES)}",
        "photo.jpg": f"photo.jpg: {NOT_AN_IMAGE}",
    }
    for name, message in expected.items():
        with pytest.raises(AppError) as caught:
            client.predict(
                handle_file(str(tmp_path / name)),
                "batch_oc",
                "fixed4",
                0.7,
                False,
                0.0,
                False,
                api_name="/segment",
            )
        assert str(caught.value) == message
    assert not (tmp_path / "marker").exists()


def test_examples_are_the_image_files_of_the_folder(tmp_path):
    for name in ("a.png", "notes.ps", "d.json", "c.gif"):
        (tmp_path / name).write_bytes(b"")
    cfg = OmegaConf.create({"app": {"examples": 5}, "data": {"val_images": str(tmp_path)}})
    assert example_images(cfg) == [tmp_path / "a.png", tmp_path / "c.gif"]


# -- what Gradio serves, and the login ------------------------------------------------------


def test_without_login_nothing_is_served(served, val_folder):
    with httpx.Client(base_url=served, trust_env=False) as http:
        root = http.get("/")
        assert root.status_code == 200 and '"auth_required":true' in root.text
        assert "tiny test network" not in root.text  # the login form, not the page
        for route in ("/config", "/gradio_api/info", f"/gradio_api/file={val_folder}/a.png"):
            assert http.get(route).status_code == 401, route
        wrong = http.post("/login", data={"username": "alice", "password": "wrong"})
        assert wrong.status_code == 400 and wrong.json() == {"detail": "Incorrect credentials."}
        assert http.get("/config").status_code == 401


def test_after_login_only_the_example_files_are_served(served, val_folder, checkpoint):
    with httpx.Client(base_url=served, trust_env=False) as http:
        login = http.post("/login", data={"username": "alice", "password": PASSWORD})
        assert login.status_code == 200 and login.json() == {"success": True}
        assert "tiny test network" in http.get("/").text
        assert http.get("/config").status_code == 200
        example = http.get(f"/gradio_api/file={val_folder}/a.png")
        assert example.status_code == 200
        assert example.content == (val_folder / "a.png").read_bytes()
        for path in (
            val_folder / "b.png",  # an image of the folder that is not an example
            val_folder / "secret.txt",
            val_folder / "annotations.json",
            val_folder,
            f"{val_folder}/%2E%2E/{val_folder.name}/b.png",  # ".." past the client
            checkpoint,
            "/etc/passwd",
        ):
            response = http.get(f"/gradio_api/file={path}")
            assert response.status_code == 403, path
            shown = str(path).replace("%2E", ".")
            assert response.json() == {"detail": f"File not allowed: {shown}."}


# -- app.auth and the warning ---------------------------------------------------------------


def test_auth_from_a_list_or_a_file(tmp_path):
    assert auth_users(None) is None
    assert auth_users(OmegaConf.create([f"alice:{PASSWORD}", "bob:a:b#c"])) == [
        ("alice", PASSWORD),
        ("bob", "a:b#c"),
    ]
    users = tmp_path / "users.txt"
    users.write_text(f"# the lab\n\nalice:{PASSWORD}\n  bob:a:b#c  \n# carol:old\n")
    assert auth_users(str(users)) == [("alice", PASSWORD), ("bob", "a:b#c")]
    check_app_settings(OmegaConf.create({**APP, "auth": str(users)}))


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ([f"alice{PASSWORD}"], "app.auth[0]='***': not user:password (no colon)"),
        ([f":{PASSWORD}"], "app.auth[0]=':***': not user:password (empty user)"),
        (
            [f"alice:{PASSWORD}", "bob:"],
            "app.auth[1]='bob:': not user:password (empty password)",
        ),
        (
            [f"alice:{PASSWORD}", f"alice:{PASSWORD}2"],
            "app.auth[1]='alice:***': user 'alice' is named twice",
        ),
        ([1234], "app.auth[0]='***': must be a user:password string"),
        (
            [],
            "app.auth=[]: names no user (expected app.auth=[user:password,...] or a file of "
            "user:password lines)",
        ),
        (
            f"alice:{PASSWORD}",  # a user:password where a file is expected
            "app.auth='alice:***': no such file (expected app.auth=[user:password,...] or a "
            "file of user:password lines)",
        ),
        (
            {"alice": PASSWORD},
            "app.auth='<DictConfig>': must be app.auth=[user:password,...] or a file of "
            "user:password lines",
        ),
    ],
)
def test_malformed_auth_is_one_line_without_the_password(auth, message):
    with pytest.raises(ConfigError) as caught:
        check_app_settings(OmegaConf.create({**APP, "auth": auth}))
    assert str(caught.value) == message
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (f"# users\nalice:{PASSWORD}\n\nbob{PASSWORD}\n", "line 4: not user:password (no colon)"),
        (f"alice:{PASSWORD}\n:{PASSWORD}\n", "line 2: not user:password (empty user)"),
        ("alice:\n", "line 1: not user:password (empty password)"),
        (f"alice:{PASSWORD}\n alice:{PASSWORD}\n", "line 2: user 'alice' is named twice"),
        (
            "# nobody yet\n\n",
            "names no user (expected app.auth=[user:password,...] or a file of user:password "
            "lines)",
        ),
    ],
)
def test_malformed_auth_file_names_its_line(tmp_path, lines, problem):
    users = tmp_path / "users.txt"
    users.write_text(lines)
    with pytest.raises(ConfigError) as caught:
        auth_users(str(users))
    assert str(caught.value) == f"app.auth={str(users)!r}: {problem}"
    assert PASSWORD not in str(caught.value)
    missing = tmp_path / "nobody.txt"
    with pytest.raises(ConfigError) as caught:
        auth_users(str(missing))
    assert str(caught.value) == (
        f"app.auth={str(missing)!r}: no such file (expected app.auth=[user:password,...] or a "
        "file of user:password lines)"
    )


def test_malformed_auth_stops_the_app_at_start(tmp_path):
    result = run_python(
        "-m",
        "entityseg.app",
        f"app.auth=[alice:{PASSWORD},bob]",
        f"hydra.run.dir={tmp_path}/hydra",
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: app.auth[1]='***': not user:password (no colon)"
    )
    assert PASSWORD not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [
        ("0.0.0.0", None, True),
        ("192.168.1.20", None, True),
        ("lab-server", None, True),
        ("0.0.0.0", [f"alice:{PASSWORD}"], False),
        ("127.0.0.1", None, False),
        ("127.0.1.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
    ],
)
def test_a_page_open_to_the_network_without_login_warns(caplog, host, auth, warned):
    app = OmegaConf.create({**APP, "host": host, "port": 8080, "auth": auth})
    with caplog.at_level(logging.WARNING, logger="entityseg.app"):
        warn_if_open_to_the_network(app)
    expected = [
        f"app.host={host}: the page is served to everyone who can reach {host}:8080 without a "
        "password; set app.auth=<file of user:password lines> (or app.auth=[user:password])"
    ]
    assert [r.getMessage() for r in caplog.records] == (expected if warned else [])
