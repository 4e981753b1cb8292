"""Models one line away: released ones by name, shared ones by Hub repository, on
``huggingface_hub``.

:func:`resolve_model` turns what a user writes wherever a checkpoint is taken
(``EntitySegmenter.from_pretrained``, ``ckpt_path=``, ``model.init_from=``) into a local file
or model folder:

* a file or folder that exists: itself (a ``.ckpt`` or a model folder of
  :mod:`entityseg.models.pretrained`);
* a released model's name (:data:`entityseg.zoo.NAMES`, e.g. ``cropformer_hornet_3x``): its
  converted folder, downloaded and converted once (:mod:`entityseg.hub.release`);
* ``user/name``: the entityseg model in that Hub repository (:mod:`entityseg.hub.repos`).
"""

from __future__ import annotations

import re
from pathlib import Path

from entityseg import zoo
from entityseg.hub.client import HubError

#: Local checkpoint files: a missing one is reported as a missing file, never looked up.
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".pkl", ".safetensors", ".onnx", ".pt2")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(source: str) -> bool:
    """``source`` reads as a Hub repository id (``user/name``), not as a local path."""
    return bool(_REPO_ID.fullmatch(source)) and not source.endswith(CHECKPOINT_SUFFIXES)


def resolve_model(
    source: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local checkpoint file or model folder for ``source`` (see the module).

    A path that does not exist comes back as it is (the reader reports it missing), unless
    it is a bare name, which is then an unknown model name: :class:`HubError` listing the
    released models.
    """
    path = Path(source)
    text = str(source)
    if path.exists():
        return path
    if text in zoo.NAMES:
        from entityseg.hub.release import released_model_folder

        return released_model_folder(text, revision=revision, token=token, cache_dir=cache_dir)
    if is_repo_id(text):
        from entityseg.hub.repos import repo_model_folder

        return repo_model_folder(text, revision=revision, token=token, cache_dir=cache_dir)
    if "/" not in text and "\\" not in text and not text.endswith(CHECKPOINT_SUFFIXES):
        raise HubError(
            f"{text}: no such file or folder, and not a released model; the names are "
            f"{', '.join(zoo.NAMES)} (or a Hub repository, user/name)"
        )
    return path


__all__ = ["HubError", "is_repo_id", "resolve_model"]
