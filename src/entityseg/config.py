"""Config checking: a bad value stops the run at once with one line naming its key."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value that cannot work, raised by constructors with the argument's name."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key}={value!r}: {problem}")


def instantiate_checked(node: DictConfig, node_key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that turns a :class:`ConfigError` into a one-line exit.

    ``node_key`` is where the node sits in the run's config (``data``, ``model``), so the
    message names the full key a user would override, e.g. ``data.crop_delta=1.5``.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise SystemExit(
                f"config error: {node_key}.{cause.key}={cause.value!r}: {cause.problem}"
            ) from None
        raise
