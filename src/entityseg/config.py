"""Config checking: a bad value stops the run at once with one line naming its key.

Library code raises :class:`ConfigError`; only the command-line entry points turn it into a
one-line exit (:func:`exits_on_config_error`, :func:`instantiate_checked`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

#: The Hydra configs, as an absolute path so every entry point finds them however it starts
#: (``python -m``, a console script, an installed wheel): ``src/entityseg/conf`` links to the
#: checkout's top-level ``conf/``, and the wheel carries a copy of it.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


class UserError(ValueError):
    """A problem a user can fix (a file, a folder, a value), told in one line: the command
    lines print it and exit with code 1, without a traceback (:func:`exits_on_config_error`).
    The library raises it; only the entry points exit."""


class ConfigError(UserError):
    """A config value that cannot work, raised by constructors with the argument's name."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")


def instantiate_checked(node: DictConfig, node_key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that raises the constructor's :class:`ConfigError` as it is,
    under its full key, instead of Hydra's wrapped exception.

    ``node_key`` is where the node sits in the run's config (``data``, ``model``), so the
    message names the full key a user would override, e.g. ``data.crop_delta=1.5``.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{node_key}.{cause.key}", cause.value, cause.problem) from None
        raise


def command_line_keys(node_key: str) -> set[str]:
    """The keys under ``node_key`` (e.g. ``data``) that this Hydra run's command line sets
    (its task overrides, a sweep's values included), not those its config files set: what a
    user asked for explicitly. Empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    prefix = f"{node_key}."
    keys = (o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
    return {key[len(prefix) :] for key in keys if key.startswith(prefix)}


_Entry = TypeVar("_Entry", bound=Callable[..., Any])


def exits_on_config_error(entry: _Entry) -> _Entry:
    """A CLI entry point whose :class:`ConfigError` becomes ``config error: <key>=<value>: ...``
    on one line and a non-zero exit, instead of a traceback, and whose other
    :class:`UserError` (a checkpoint, a photo, an output folder) becomes its one line.

    Goes under ``@hydra.main`` (Hydra reports exceptions itself), with
    ``config_path=CONFIG_DIR``.
    """

    @functools.wraps(entry)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return entry(*args, **kwargs)
        except ConfigError as err:
            raise SystemExit(f"config error: {err}") from None
        except UserError as err:
            raise SystemExit(str(err)) from None

    return wrapper  # type: ignore[return-value]
