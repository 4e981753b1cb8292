"""The library installed from its wheel, used outside the checkout.

The wheel is built from a copy of this repository's sources (a build folder left in the
checkout cannot leak stale files into it) and installed (without dependencies: they are this
environment's) into a folder of its own; every command then runs from an empty folder with
only that install on the path, so a config or a module found through the checkout fails here.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_tiny_checkpoint

#: The checkpoint's test views: predict must use these, not the data config's.
VIEWS = {
    "test_short_size": 96,
    "test_max_size": 160,
    "size_scale": 1.0,
    "crop_delta": 0.6,
    "test_crop_layout": "fixed8",
    "test_crop_resize": "same",
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the wheel was installed into (``--target``)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # what the wheel is built from, without the checkout's build/
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("src", "conf"):  # src/entityseg/conf stays a link to conf/
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", root / "wheel"]
    subprocess.run(build, check=True, timeout=300, cwd=root)
    (wheel,) = (root / "wheel").glob("entityseg-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", root / "site", wheel], check=True)
    return root / "site"


def run_installed(
    site: Path, cwd: Path, *command: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``command`` from ``cwd`` with the installed package first on the path (``env``: more
    environment variables)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    return subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny network's checkpoint as training writes it: weights, network config, views."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", VIEWS)


def test_the_wheel_carries_every_config(installed):
    packaged = {p.relative_to(installed / "entityseg" / "conf") for p in installed.rglob("*.yaml")}
    in_checkout = {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
    assert packaged == in_checkout


def test_installed_commands_and_api_run_outside_the_checkout(installed, checkpoint, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    photo = np.random.default_rng(0).integers(0, 255, (120, 170, 3), dtype=np.uint8)
    Image.fromarray(photo).save(work / "photo.png")
    python = sys.executable

    imported = run_installed(
        installed, work, python, "-c", "import entityseg; print(entityseg.__file__)"
    )
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(installed)  # not the checkout's

    # the console scripts compose their configs from the package
    for script, overrides in [
        ("entityseg-train", ["experiment=cropformer_swinl"]),
        ("entityseg-evaluate", ["ckpt_path=x.ckpt"]),
    ]:
        composed = run_installed(
            installed, work, installed / "bin" / script, *overrides, "--cfg", "job"
        )
        assert composed.returncode == 0, composed.stderr
        assert "task_name:" in composed.stdout

    predicted = run_installed(
        installed,
        work,
        installed / "bin" / "entityseg-predict",
        f"ckpt_path={checkpoint}",
        "input=photo.png",
        "output=out",
    )
    assert predicted.returncode == 0, predicted.stderr
    shard = (work / "out/predictions.rank0.jsonl").read_text()
    settings = json.loads(shard.splitlines()[0])["settings"]
    assert settings["views.crop_layout"] == "fixed8"  # the checkpoint's views, no experiment=
    assert settings["views.crop_delta"] == 0.6
    assert (work / "out/photo_entities.png").is_file()
    predictions = json.loads((work / "out/predictions.json").read_text())

    script = (
        "import json, sys\n"
        "from entityseg import EntitySegmenter\n"
        "segmenter = EntitySegmenter.from_checkpoint(sys.argv[1], device='cpu')\n"
        "entities = segmenter('photo.png')\n"
        "print(json.dumps([{**r, 'file_name': 'photo.png'} for r in entities.to_coco(1)]))\n"
    )
    api = run_installed(installed, work, python, "-c", script, str(checkpoint))
    assert api.returncode == 0, api.stderr
    assert json.loads(api.stdout.strip().splitlines()[-1]) == predictions

    converted = run_installed(installed, work, installed / "bin" / "entityseg-convert", "--help")
    assert converted.returncode == 0 and "release" in converted.stdout


def test_installed_models_by_name_from_a_loopback_hub(installed, shared_data, tmp_path):
    """From an empty folder with the wheel: a released model by name from a (loopback) Hub,
    the gated error without a token, save_pretrained -> from_pretrained, and offline reuse."""
    from entityseg import zoo
    from hub_server import LoopbackHub

    reference = shared_data / "official_reference/cropformer_hornet_tiny"
    folder = f"{zoo.FOLDER}/CropFormer_hornet_3x"
    work = tmp_path / "elsewhere"
    work.mkdir()
    photo = np.random.default_rng(0).integers(0, 255, (120, 170, 3), dtype=np.uint8)
    Image.fromarray(photo).save(work / "photo.png")
    script = (
        "import json, sys\n"
        "from entityseg import EntitySegmenter\n"
        "from entityseg.hub import HubError\n"
        "if sys.argv[1] == 'save':  # no token yet: the gated repository's one line\n"
        "    try:\n"
        "        EntitySegmenter.from_pretrained('cropformer_hornet_3x')\n"
        "    except HubError as err:\n"
        "        print(err)\n"
        "segmenter = EntitySegmenter.from_pretrained(\n"
        "    'cropformer_hornet_3x', device='cpu', token=sys.argv[2] if sys.argv[2:] else None)\n"
        "entities = segmenter('photo.png')\n"
        "if sys.argv[1] == 'save':\n"
        "    segmenter.save_pretrained('mine')\n"
        "    again = EntitySegmenter.from_pretrained('mine', device='cpu')('photo.png')\n"
        "    assert again.rles == entities.rles\n"
        "print(json.dumps(entities.rles))\n"
    )
    with LoopbackHub() as hub:
        files = {f"{folder}/CropFormer_hornet_3x_03823a.pth": reference / "model_final.pth",
                 f"{folder}/config.yaml": reference / "config.yaml"}  # fmt: skip
        hub.add_repo(zoo.REPO_ID, repo_type=zoo.REPO_TYPE, files=files, gated=True)
        hub.tokens = {"hf_good"}
        env = hub.env(tmp_path / "hf")
        online = run_installed(
            installed, work, sys.executable, "-c", script, "save", "hf_good", env=env
        )
        assert online.returncode == 0, online.stderr
        (line,) = [x for x in online.stdout.splitlines() if "gated" in x]
        assert zoo.REPO_ID in line and "hf auth login" in line
    assert sorted(p.name for p in (work / "mine").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    offline = run_installed(  # the hub is gone: the cache alone
        installed, work, sys.executable, "-c", script, "load", env={**env, "HF_HUB_OFFLINE": "1"}
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines()[-1] == online.stdout.splitlines()[-1]
    assert json.loads(online.stdout.splitlines()[-1])  # some entities
