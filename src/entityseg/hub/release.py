"""The released models by name: found on the Hub, downloaded, converted once, then cached.

:func:`released_model_folder` ("cropformer_hornet_3x") does what a user did by hand:

1. lists the model's folder in :data:`entityseg.zoo.REPO_ID` (so the file name's hash suffix
   need not be known; ``revision`` pins a commit) and reads the checkpoint's etag;
2. when a converted copy for that etag is cached, returns it: nothing is downloaded or
   converted (offline too, from the record of the last online call);
3. else downloads the checkpoint with ``hf_hub_download`` (the Hub's cache: resumable,
   shared, ``HF_HUB_OFFLINE``), converts it with the release's yaml when the folder holds one,
   else with the network and test views of the entityseg experiment that equals its config
   (:attr:`ReleasedModel.experiment <entityseg.zoo.ReleasedModel.experiment>`), and writes
   the model folder (:mod:`entityseg.models.pretrained`: safetensors, ``config.json`` and a
   model card that keeps the release's licence and credits its authors) under
   ``<cache>/converted/<etag>``.

The same lookup finds a release experiment's starting weights (``init_from_release``) in
:data:`entityseg.zoo.PRETRAINED_FOLDER`: :func:`release_init_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.hf_api import RepoFile

from entityseg import zoo
from entityseg.data.views import ViewConfig
from entityseg.hub.card import architecture_of
from entityseg.hub.client import HubError, cache_root, hub_errors, offline
from entityseg.interop.release import (
    ReleaseConversionError,
    convert_release_weights,
    load_release_config,
    net_config_from_release,
    release_sized,
    release_view_keys,
    test_views_from_release,
)
from entityseg.models.checkpoint import stored_network
from entityseg.models.pretrained import is_pretrained_folder, model_config, write_pretrained

log = logging.getLogger(__name__)

#: What a release checkpoint is called in its folder (``.pth``: ``{"model": ...}``;
#: ``.pkl``: detectron2's numpy pickle, read without running code).
RELEASE_SUFFIXES = (".pth", ".pkl")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository at one commit, as the Hub describes it."""

    repo_id: str
    repo_type: str
    path: str
    commit: str
    etag: str
    size: int | None

    def record(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "path": self.path,
            "revision": self.commit,
            "etag": self.etag,
        }


def released_model_folder(
    name: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The converted model folder of the released model ``name`` (:data:`entityseg.zoo.NAMES`),
    downloaded and converted on first use (see the module). Raises :class:`HubError` in one
    line: an unknown name (listing the names), a gated repository without access, no
    network and nothing cached, a download cut off, a file that is not a checkpoint."""
    model = zoo.released_model(name)
    if model is None:
        raise HubError(f"{name}: not a released model; the names are {', '.join(zoo.NAMES)}")
    refs = _Refs(cache_root(cache_dir), name, revision)
    if offline():
        return _cached_offline(refs, name, token, cache_dir)
    files = _list_folder(model.path, revision, token)
    weights = _checkpoint_in(files, model.path)
    source = _describe(weights.path, revision, token)
    folder = converted_folder(source, cache_dir)
    yaml = next((f.path for f in files if f.path.endswith((".yaml", ".yml"))), None)
    if not is_pretrained_folder(folder):
        _convert(model, source, yaml, folder, token, cache_dir)
    refs.save(source, yaml)
    return folder


def converted_folder(source: HubFile, cache_dir: str | Path | None = None) -> Path:
    """Where the converted model of a Hub checkpoint is cached: keyed by the file's etag, so
    a new upload is converted again and the same file never is."""
    return cache_root(cache_dir) / "converted" / source.etag


def release_init_folder(
    weights: str,
    net_config: Mapping[str, Any],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path | None:
    """A release experiment's starting weights (``init_from_release.weights``, e.g.
    ``entityv2_50ep_with_coco_same_epoch_model_final.pth``) from
    :data:`entityseg.zoo.PRETRAINED_FOLDER`, converted for ``net_config`` (the experiment's
    network; a file without an association module is stored as the Mask2Former it is, so
    fine-tuning starts the association fresh, as ``model.init_from`` does with any
    Mask2Former checkpoint) into a cached model folder; None when the Hub's folder holds no
    such file (a name with or without the Hub's hash suffix)."""
    files = _list_folder(zoo.PRETRAINED_FOLDER, revision, token)
    stem = Path(weights).stem
    match = [f for f in files if Path(f.path).name == weights] or [
        f
        for f in files
        if Path(f.path).stem.startswith(stem + "_") and f.path.endswith(RELEASE_SUFFIXES)
    ]
    if not match:
        return None
    source = _describe(match[0].path, revision, token)
    folder = converted_folder(source, cache_dir)
    if not is_pretrained_folder(folder):
        path = _download(source, token, cache_dir)
        state, backbone_only = _converted(path, source, net_config, ("association.",))
        network = stored_network(net_config)
        if not any(k.startswith("association.") for k in state):  # a Mask2Former's weights
            network["association"] = {**network["association"], "enabled": False}
        config = model_config(
            network,
            dict(ViewConfig.TEST_KEYS),  # the release recipe's test views
            {"compat": "release"},
            {**source.record(), "backbone_only": backbone_only},
        )
        _write_folder(folder, state, config, card=None)
    return folder


# --------------------------------------------------------------------------- steps


def _list_folder(path: str, revision: str | None, token: str | bool | None) -> list[RepoFile]:
    with hub_errors(zoo.REPO_ID, zoo.REPO_TYPE, path, token):
        entries = HfApi().list_repo_tree(
            zoo.REPO_ID, path, revision=revision, repo_type=zoo.REPO_TYPE, token=token
        )
        return [entry for entry in entries if isinstance(entry, RepoFile)]


def _checkpoint_in(files: list[RepoFile], folder: str) -> RepoFile:
    """The one checkpoint file of a model's folder."""
    found = [f for f in files if f.path.endswith(RELEASE_SUFFIXES)]
    if len(found) != 1:
        listed = ", ".join(Path(f.path).name for f in files) or "nothing"
        raise HubError(
            f"{zoo.REPO_ID}/{folder}: expected one checkpoint ({' or '.join(RELEASE_SUFFIXES)})"
            f" in the folder, found {len(found)} (it holds {listed})"
        )
    return found[0]


def _describe(path: str, revision: str | None, token: str | bool | None) -> HubFile:
    """The file's commit and etag (one HEAD request; nothing is downloaded)."""
    with hub_errors(zoo.REPO_ID, zoo.REPO_TYPE, path, token):
        url = hf_hub_url(zoo.REPO_ID, path, repo_type=zoo.REPO_TYPE, revision=revision)
        meta = get_hf_file_metadata(url, token=token)
    return HubFile(zoo.REPO_ID, zoo.REPO_TYPE, path, meta.commit_hash, meta.etag, meta.size)


def _download(
    source: HubFile, token: str | bool | None, cache_dir: str | Path | None, path: str = ""
) -> Path:
    """A file of ``source``'s commit from the Hub's cache, downloaded when missing."""
    path = path or source.path
    with hub_errors(source.repo_id, source.repo_type, path, token):
        return Path(
            hf_hub_download(
                source.repo_id,
                path,
                repo_type=source.repo_type,
                revision=source.commit,
                token=token,
                cache_dir=cache_dir,
            )
        )


def _convert(
    model: zoo.ReleasedModel,
    source: HubFile,
    yaml: str | None,
    folder: Path,
    token: str | bool | None,
    cache_dir: str | Path | None,
) -> None:
    """Download and convert a released model into ``folder``."""
    weights = _download(source, token, cache_dir)
    if yaml is not None:  # the release's own config beside the checkpoint wins
        config = load_release_config(_download(source, token, cache_dir, yaml))
        net_config = net_config_from_release(config)
        views = release_view_keys(test_views_from_release(config))
        recipe = f"the release's {Path(yaml).name}"
    else:
        net_config, views = experiment_recipe(model.experiment)
        recipe = f"experiment={model.experiment}"
    log.info("converting %s/%s with %s", source.repo_id, source.path, recipe)
    state, _ = _converted(weights, source, net_config)
    sized = release_sized(ViewConfig.from_keys(views)).to_keys()
    batch = architecture_of(net_config) == "CropFormer"
    settings = {"compat": "release", "mode": "batch_oc" if batch else "image_o"}
    config = model_config(
        stored_network(net_config), sized, settings, {**source.record(), "recipe": recipe}
    )
    _write_folder(folder, state, config, card=_release_card(model, net_config, source))


def _converted(
    weights: Path, source: HubFile, net_config: Mapping, allow_missing: tuple[str, ...] = ()
) -> tuple[dict, bool]:
    try:
        return convert_release_weights(weights, net_config, allow_missing)
    except ReleaseConversionError as err:
        reason = _after_path(str(err), weights)
        raise HubError(f"{source.repo_id}/{source.path}: {reason}") from None


def experiment_recipe(experiment: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The network configuration and test-view keys of ``conf/experiment/<experiment>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from entityseg.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3", job_name="from_pretrained"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    network = OmegaConf.to_container(cfg.model.net, resolve=True)
    network.pop("_target_", None)
    return network, ViewConfig.test_keys_of(cfg.data)


def _release_card(model: zoo.ReleasedModel, net_config: Mapping, source: HubFile):
    from entityseg.hub.card import CardInfo

    return CardInfo(
        name=model.name,
        license=model.license,
        architecture=model.architecture,
        backbone=str(net_config["backbone"]["name"]),
        num_queries=int(net_config["decoder"]["num_queries"]),
        dataset="EntitySeg",
        datasets=[zoo.REPO_ID],  # the EntitySeg images are in the same Hub repository
        source=source.record(),
    )


def _write_folder(folder: Path, state: Mapping, config: Mapping, card) -> None:
    """Write a model folder beside ``folder`` and rename it into place, so a cached folder is
    always complete (a killed conversion leaves only a ``.tmp-<pid>`` folder, removed)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_pretrained(tmp, state, config)
        if card is not None:
            from entityseg.hub.card import write_model_card

            write_model_card(tmp, card)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted the same file first: theirs stays
            if not is_pretrained_folder(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _after_path(message: str, path: Path) -> str:
    """An error line without its leading local path (the Hub file is named instead)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --------------------------------------------------------------------------- offline


class _Refs:
    """The last online answer for (name, revision): which file and etag, so an offline call
    finds the converted folder without asking the Hub."""

    def __init__(self, root: Path, name: str, revision: str | None) -> None:
        self.path = root / "refs" / name / (revision or "main")

    def save(self, source: HubFile, yaml: str | None) -> None:
        from entityseg.atomic_checkpoint import write_atomically

        text = json.dumps({**source.record(), "yaml": yaml}, indent=2)
        write_atomically(self.path.with_suffix(".json"), lambda tmp: tmp.write_text(text))

    def load(self) -> dict | None:
        path = self.path.with_suffix(".json")
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None


def _cached_offline(
    refs: _Refs, name: str, token: str | bool | None, cache_dir: str | Path | None
) -> Path:
    record = refs.load()
    if record is not None:
        source = HubFile(
            record["repo_id"], record["repo_type"], record["path"], record["revision"],
            record["etag"], None,
        )  # fmt: skip
        folder = converted_folder(source, cache_dir)
        if is_pretrained_folder(folder):
            return folder
        model = zoo.released_model(name)  # converted again from the Hub's cache
        _convert(model, source, record.get("yaml"), folder, token, cache_dir)
        return folder
    raise HubError(
        f"{name}: not in the cache, and HF_HUB_OFFLINE=1 keeps the Hub out of reach: run once "
        "with the network to download and convert it"
    )
