"""``python -m entityseg.app ckpt_path=... [app.host=127.0.0.1 app.port=7860]``: the web demo.

The checkpoint is loaded as ``predict`` loads it (its test views, mode and compat; ``inference.*``
and ``data.<test key>=...`` on the command line change the page's starting choices). Without
``ckpt_path`` the page says how to get a checkpoint. Downloads are written under the run's
output folder (``outputs/app/runs/<time>/results``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from entityseg.config import CONFIG_DIR, ConfigError, exits_on_config_error, instantiate_checked

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


def example_images(cfg: DictConfig) -> list[Path]:
    """The first ``app.examples`` validation images of the ``data`` config, the synthetic
    validation scenes generated first if they are not on disk yet."""
    if cfg.app.examples == 0:
        return []
    if cfg.data.get("synthetic") is not None:
        instantiate_checked(cfg.data, "data").prepare_data(splits=("val",))
    from entityseg.predict import IMAGE_SUFFIXES

    folder = Path(cfg.data.val_images)
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return images[: cfg.app.examples]


def how_to_get_a_checkpoint(log_dir: str | Path) -> str:
    """What to do without ``ckpt_path``: the demo's checkpoints already on disk, if any, and
    the two ways to make one."""
    found = sorted(
        Path(log_dir).glob("*/runs/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime
    )
    lines = ["No checkpoint given: start the app with `ckpt_path=<file>`."]
    if found:
        lines.append(f"The newest one on disk is `{found[-1]}`:")
        lines.append(f"`python -m entityseg.app ckpt_path={found[-1]}`")
    lines += [
        "To make one:",
        "- train the demo model on the synthetic scenes (a few minutes on a CPU): `make demo`, "
        "then use its `outputs/demo/runs/<time>/checkpoints/best_*.ckpt`;",
        '- or convert a released CropFormer checkpoint (README, "Released models"): '
        "`python -m entityseg.convert_release model_final.pth <its config.yaml> "
        "cropformer.ckpt`.",
    ]
    return "\n\n".join(lines)


def serve(page, app: DictConfig, allowed: list[Path], block: bool = True):
    """Serve ``page`` on ``app.host``:``app.port``, one segmentation at a time (the model is
    shared). Returns Gradio's (app, local url, share url) when ``block`` is False."""
    from entityseg.app.page import THEME

    return page.queue(default_concurrency_limit=1).launch(
        server_name=app.host,
        server_port=app.port or None,
        theme=THEME,
        ssr_mode=False,
        max_file_size=f"{app.max_file_mb}mb",
        allowed_paths=[str(p) for p in allowed],
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
        serve(missing_checkpoint_page(message), cfg.app, [])
        return
    from entityseg.evaluate import segmenter_from_config

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
        f"side {views.short_sizes[0]}, max {views.max_size}, compat `{segmenter.compat}`."
    )
    page = build_page(service, examples, about)
    serve(page, cfg.app, [workdir, *{p.parent for p in examples}])


if __name__ == "__main__":
    main()
