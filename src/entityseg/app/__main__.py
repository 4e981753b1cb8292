"""``python -m entityseg.app ckpt_path=... [app.host=127.0.0.1 app.port=7860]``: the web demo.

The checkpoint is loaded as ``predict`` loads it (its test views, mode and compat; ``inference.*``
and ``data.<test key>=...`` on the command line change the page's starting choices). Without
``ckpt_path`` the page says how to get a checkpoint. Downloads are written under the run's
output folder (``outputs/app/runs/<time>/results``).

Gradio serves the example files and the results folder, nothing else of the disk. With
``app.auth`` (a list of ``user:password`` strings, or a file of ``user:password`` lines) the
page asks for a login; a page served beyond this machine (``app.host`` not a loopback address)
without one logs a warning.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from entityseg.config import CONFIG_DIR, ConfigError, exits_on_config_error, instantiate_checked
from entityseg.data.coco_entity import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


def check_app_settings(app: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the ``app.*`` key of a value that cannot work."""
    if not isinstance(app.port, int) or not 0 <= app.port <= 65535:
        raise ConfigError("app.port", app.port, "must be a port number (0: any free port)")
    for key, minimum in (
        ("max_megapixels", 0),
        ("max_file_mb", 0),
        ("display_side", 0),
        ("keep_results", 0),
    ):
        value = app[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
            raise ConfigError(f"app.{key}", value, f"must be a number > {minimum}")
    if isinstance(app.examples, bool) or not isinstance(app.examples, int) or app.examples < 0:
        raise ConfigError("app.examples", app.examples, "must be an integer >= 0")
    auth_users(app.get("auth"))


#: What ``app.auth`` holds, said in its error messages.
AUTH_FORMS = "app.auth=[user:password,...] or a file of user:password lines"


def auth_users(auth: object) -> list[tuple[str, str]] | None:
    """The ``(user, password)`` pairs of ``app.auth``: ``None`` (no login), a list of
    ``user:password`` strings, or the path of a file with one ``user:password`` per line (lines
    stripped, blank lines and ``#`` comments ignored). The password is all after the first colon.

    Raises :class:`ConfigError` naming ``app.auth`` (and the list entry or the file's line
    number) for a missing file, an entry without a colon, an empty user or password, a user
    named twice or no user at all. Its message never holds a password.
    """
    if auth is None:
        return None
    users: list[tuple[str, str]] = []
    if isinstance(auth, str):
        path = Path(auth).expanduser()
        if not path.is_file():
            shown = _hidden(auth) if ":" in auth else auth  # perhaps user:password itself
            raise ConfigError("app.auth", shown, f"no such file (expected {AUTH_FORMS})")
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as err:
            raise ConfigError("app.auth", auth, f"cannot be read ({err.strerror})") from None
        for n, line in enumerate(lines, 1):
            entry = line.strip()
            if entry and not entry.startswith("#"):
                try:
                    users.append(_user_password(entry, users))
                except ValueError as err:
                    raise ConfigError("app.auth", auth, f"line {n}: {err}") from None
    elif isinstance(auth, list | tuple | ListConfig):
        for k, entry in enumerate(auth):
            if not isinstance(entry, str):
                raise ConfigError(f"app.auth[{k}]", "***", "must be a user:password string")
            try:
                users.append(_user_password(entry, users))
            except ValueError as err:
                raise ConfigError(f"app.auth[{k}]", _hidden(entry), str(err)) from None
    else:
        raise ConfigError("app.auth", f"<{type(auth).__name__}>", f"must be {AUTH_FORMS}")
    if not users:
        raise ConfigError("app.auth", auth, f"names no user (expected {AUTH_FORMS})")
    return users


def _user_password(entry: str, users: list[tuple[str, str]]) -> tuple[str, str]:
    """``user:password`` as a pair; :class:`ValueError` saying what is wrong otherwise."""
    user, colon, password = entry.partition(":")
    user = user.strip()
    if not colon:
        raise ValueError("not user:password (no colon)")
    if not user:
        raise ValueError("not user:password (empty user)")
    if not password:
        raise ValueError("not user:password (empty password)")
    if any(user == known for known, _ in users):
        raise ValueError(f"user {user!r} is named twice")
    return user, password


def _hidden(entry: str) -> str:
    """``user:password`` shown as ``user:***`` (all of it hidden without a colon)."""
    user, colon, password = entry.partition(":")
    return f"{user}:***" if colon and password else entry if colon else "***"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` serves this machine only: ``localhost``, 127.0.0.0/8 or ::1 (``None``
    is Gradio's default, 127.0.0.1)."""
    if host is None or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name or an interface's address: the network can reach it


def warn_if_open_to_the_network(app: DictConfig) -> None:
    """Log one warning when the page is served beyond this machine without ``app.auth``."""
    if app.get("auth") is None and not is_loopback(app.host):
        log.warning(
            "app.host=%s: the page is served to everyone who can reach %s:%s without a "
            "password; set app.auth=<file of user:password lines> (or app.auth=[user:password])",
            app.host,
            app.host,
            app.port,
        )


def example_images(cfg: DictConfig) -> list[Path]:
    """The first ``app.examples`` validation images of the ``data`` config, the synthetic
    validation scenes generated first if they are not on disk yet."""
    if cfg.app.examples == 0:
        return []
    if cfg.data.get("synthetic") is not None:
        instantiate_checked(cfg.data, "data").prepare_data(splits=("val",))
    folder = Path(cfg.data.val_images)
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return images[: cfg.app.examples]


def how_to_get_a_checkpoint(log_dir: str | Path) -> str:
    """What to do without ``ckpt_path``: the demo's checkpoints already on disk, if any, and
    the two ways to make one."""
    found = sorted(
        Path(log_dir).glob("*/runs/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    lines = ["No checkpoint given: start the app with `ckpt_path=<file, folder or name>`."]
    if found:
        lines.append(f"The newest one on disk is `{found[-1]}`:")
        lines.append(f"`python -m entityseg.app ckpt_path={found[-1]}`")
    lines += [
        "To make one:",
        "- train the demo model on the synthetic scenes (a few minutes on a CPU): `make demo`, "
        "then use its `outputs/demo/runs/<time>/checkpoints/best_*.ckpt`;",
        "- or use a released model by name, downloaded from the Hub once (README, "
        '"Released models"): `python -m entityseg.app ckpt_path=cropformer_swin_tiny_3x`.',
    ]
    return "\n\n".join(lines)


def serve(
    page,
    app: DictConfig,
    examples: Sequence[Path] = (),
    workdir: Path | None = None,
    block: bool = True,
):
    """Serve ``page`` on ``app.host``:``app.port``, one segmentation at a time (the model is
    shared), behind ``app.auth``'s login if set. Returns Gradio's (app, local url, share url)
    when ``block`` is False.

    Gradio's file route serves the ``examples`` files (not the rest of their folder) and
    ``workdir``, where the downloads are written; besides them only its own cache (uploads
    and what the page shows).
    """
    from entityseg.app.page import THEME

    warn_if_open_to_the_network(app)
    allowed = [*examples, *([workdir] if workdir is not None else [])]
    return page.queue(default_concurrency_limit=1).launch(
        server_name=app.host,
        server_port=app.port or None,
        theme=THEME,
        ssr_mode=False,
        max_file_size=f"{app.max_file_mb}mb",
        allowed_paths=[str(Path(p).resolve()) for p in allowed],
        auth=auth_users(app.get("auth")),
        prevent_thread_lock=not block,
        quiet=not block,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
@exits_on_config_error
def main(cfg: DictConfig) -> None:
    check_app_settings(cfg.app)
    try:
        from entityseg.app.page import build_page, missing_checkpoint_page
        from entityseg.app.service import SegmentationService
    except ImportError as err:
        raise SystemExit(f"the web app needs Gradio ({err}): pip install -e '.[app]'") from None
    if cfg.ckpt_path is None:
        message = how_to_get_a_checkpoint(cfg.paths.log_dir)
        log.warning(message.replace("\n\n", "\n"))
        serve(missing_checkpoint_page(message), cfg.app)
        return
    from entityseg.api import segmenter_from_config

    segmenter = segmenter_from_config(cfg)
    examples = example_images(cfg)
    workdir = Path(cfg.paths.output_dir) / "results"
    service = SegmentationService(
        segmenter,
        workdir,
        max_megapixels=cfg.app.max_megapixels,
        keep_results=cfg.app.keep_results,
        display_side=cfg.app.display_side,
    )
    views = segmenter.views
    about = (
        f"Checkpoint `{Path(cfg.ckpt_path).name}` on {segmenter.device.type}; test views: short "
        f"side {views.short_sizes[0]}, max {views.max_size}, compat `{segmenter.settings.compat}`."
    )
    page = build_page(service, examples, about)
    serve(page, cfg.app, examples, workdir)


if __name__ == "__main__":
    main()
