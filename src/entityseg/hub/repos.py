"""Models in the entityseg format on the Hub: a user's repository, downloaded or uploaded.

A repository made by :meth:`~entityseg.api.EntitySegmenter.push_to_hub` holds one model
folder (:mod:`entityseg.models.pretrained`): ``model.safetensors``, ``config.json`` and the
model card ``README.md``. Downloading takes those three files only, into the Hub's cache.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from entityseg.hub.client import HubError, hub_errors
from entityseg.models.checkpoint import CheckpointError
from entityseg.models.pretrained import CARD_FILE, CONFIG_FILE, MODEL_FILE, read_model_config

#: The files of a model folder on the Hub.
MODEL_FILES = [MODEL_FILE, CONFIG_FILE, CARD_FILE]


def repo_model_folder(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The model folder of Hub repository ``repo_id`` (``user/name``) in the Hub's cache,
    downloaded when missing (offline: the cached snapshot). One :class:`HubError` line for a
    repository that does not exist, is private or gated, or holds no entityseg model (its
    ``config.json`` is read first: another library's model is never downloaded whole)."""
    options = dict(revision=revision, token=token, cache_dir=cache_dir)
    with hub_errors(repo_id, "model", CONFIG_FILE, token=token):
        config = Path(hf_hub_download(repo_id, CONFIG_FILE, **options))
    try:  # another library's model is refused before its weights are downloaded
        read_model_config(config.parent)
    except CheckpointError as err:
        raise HubError(f"{repo_id}: holds no entityseg model ({err})") from None
    with hub_errors(repo_id, "model", token=token):
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, **options))


def push_model_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload entityseg model",
) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload the model folder
    with ``huggingface_hub``'s upload; returns the commit's URL."""
    api = HfApi(token=token)
    with hub_errors(repo_id, "model", token=token):
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=MODEL_FILES,
            commit_message=commit_message,
        )
    return str(commit)
