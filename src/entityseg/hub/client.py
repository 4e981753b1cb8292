"""What entityseg asks of the Hugging Face Hub, through ``huggingface_hub``'s own client, with
every failure turned into one line that says what to do.

Downloads go to the Hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``, or ``cache_dir``): resumable,
shared with every other library, offline with ``HF_HUB_OFFLINE=1``; tokens come from
``token=``, ``HF_TOKEN`` or ``hf auth login``; ``HF_ENDPOINT`` points at another Hub.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, is_offline_mode
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token

from entityseg.models.checkpoint import CheckpointError


class HubError(CheckpointError):
    """A model that could not be had from the Hub (access, network, cache), in one line."""


def repo_url(repo_id: str, repo_type: str | None = None) -> str:
    """The repository's page, where its conditions are accepted."""
    prefix = "" if repo_type in (None, "model") else f"{repo_type}s/"
    return f"{constants.ENDPOINT}/{prefix}{repo_id}"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where entityseg keeps what it makes of Hub files (converted release models):
    ``<cache_dir>/entityseg`` or ``$HF_HOME/entityseg``."""
    return Path(cache_dir) / "entityseg" if cache_dir else Path(constants.HF_HOME) / "entityseg"


def offline() -> bool:
    """``HF_HUB_OFFLINE=1``: only the cache is used."""
    return is_offline_mode()


@contextmanager
def hub_errors(
    repo_id: str,
    repo_type: str | None = None,
    what: str | None = None,
    token: str | bool | None = None,
) -> Iterator[None]:
    """Turn ``huggingface_hub``'s and the network's errors into one :class:`HubError` line
    naming ``repo_id`` (and ``what``: the file or folder asked for)."""
    name = f"{repo_id}/{what}" if what else repo_id
    try:
        yield
    except GatedRepoError:
        login = (
            "the token given has no access to it"
            if (token or get_token())
            else "no Hugging Face token was found"
        )
        raise HubError(
            f"{repo_id} is a gated repository and {login}: accept its conditions at "
            f"{repo_url(repo_id, repo_type)} (logged in), then log in here with `hf auth "
            "login` or set HF_TOKEN (or pass token=)"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such repository on the Hub ({repo_type or 'model'}), or it is "
            "private: check the name, or log in (`hf auth login`, HF_TOKEN) if it is yours"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{name}: no such revision in {repo_id}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise HubError(
            f"{name}: not in the cache, and the Hub cannot be reached "
            f"({'HF_HUB_OFFLINE=1' if offline() else 'no connection'}): run once with the "
            "network to download it"
        ) from None
    except EntryNotFoundError:
        raise HubError(f"{name}: no such file in {repo_id}") from None
    except HfHubHTTPError as err:
        raise HubError(f"{name}: the Hub answered {_first_line(err)}") from None
    except _TRANSPORT_ERRORS as err:
        raise HubError(
            f"{name}: the connection to the Hub failed or was cut off ({_first_line(err)}), "
            "and huggingface_hub's own retries (which resume a download from the bytes it "
            "received) gave up: run the same again, or set HF_HUB_OFFLINE=1 to use only what "
            "is cached"
        ) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors of the HTTP client huggingface_hub sends with (``httpx``; ``httpx2``
    from huggingface_hub 2), which are not ``OSError``s."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


_TRANSPORT_ERRORS = _transport_errors()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
