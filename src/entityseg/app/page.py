"""The web page (Gradio): upload or pick a photo, choose how to segment it, see and download the
entities. The work is :class:`~entityseg.app.service.SegmentationService`'s; this module lays it
out and turns its one-line errors into messages on the page (never a stack trace)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from entityseg.app.service import Choices, SegmentationService, UploadError
from entityseg.config import ConfigError
from entityseg.data.coco_entity import IMAGE_SUFFIXES
from entityseg.data.views import TEST_CROP_LAYOUTS
from entityseg.inference.settings import PAPER_NAMES
from entityseg.viz import draw_boxes

log = logging.getLogger(__name__)

TITLE = "entityseg: CropFormer entity segmentation"

#: System fonts only: the page asks no font server for anything (labs without internet).
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)


def build_page(
    service: SegmentationService, examples: Sequence[Path] = (), about: str = ""
) -> gr.Blocks:
    """The demo page of ``service``; ``examples``: photos offered beside the upload;
    ``about``: a line on the checkpoint and its views. The ``elem_id`` s are what
    ``tests/test_app_browser.py`` looks for."""
    defaults = service.defaults
    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600), analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\n{about}")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                # the suffixes are checked by Gradio when the button's request arrives; what
                # the file holds, by read_upload
                upload = gr.File(
                    label="Photo",
                    type="filepath",
                    file_types=list(IMAGE_SUFFIXES),
                    elem_id="upload",
                )
                if examples:
                    gr.Examples(
                        [[str(p)] for p in examples],
                        inputs=[upload],
                        label="Examples: validation images",
                    )
                mode = gr.Radio(
                    [(PAPER_NAMES[m], m) for m in service.modes],
                    value=defaults.mode if defaults.mode in service.modes else service.modes[0],
                    label="Inference mode (paper Table 7)",
                )
                layout = gr.Radio(
                    list(TEST_CROP_LAYOUTS), value=defaults.crop_layout, label="Test crop layout"
                )
                delta = gr.Slider(
                    0.3, 1.0, value=defaults.crop_delta, step=0.05, label="Crop ratio delta"
                )
                overlapping = gr.Checkbox(
                    value=defaults.overlapping,
                    label="Overlapping masks (the paper's AP)",
                    interactive=service.can_overlap,
                    info=None if service.can_overlap else "compat=release: non-overlapping only",
                    elem_id="overlapping",
                )
                threshold = gr.Slider(
                    0.0, 1.0, value=defaults.score_threshold, step=0.01, label="Score threshold"
                )
                compare = gr.Checkbox(
                    value=False,
                    label="Image-O beside Batch-OC (what the crops recover)",
                    visible=len(service.modes) > 1,
                )
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    shown_input = gr.Image(
                        label="Input, crops drawn",
                        interactive=False,
                        elem_id="input-view",
                    )
                    overlay = gr.Image(label="Entities", interactive=False, elem_id="overlay")
                summary = gr.Markdown(elem_id="summary")
                comparison = gr.Image(
                    label="Image-O | Batch-OC, what the crops recovered in colour",
                    show_label=False,  # the panels carry their own labels
                    interactive=False,
                    visible=False,
                    elem_id="comparison",
                )
                downloads = gr.File(
                    label="Downloads: entity-id PNG (16-bit), overlay, COCO results",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )

        # a gr.Progress() default is how Gradio knows to show a progress bar
        def segment(
            path,
            mode,
            layout,
            delta,
            overlapping,
            threshold,
            compare,
            progress=gr.Progress(),  # noqa: B008
        ):
            choices = Choices(mode, layout, delta, overlapping, threshold, compare)
            return _segment(service, path, choices, progress)

        run.click(
            segment,
            [upload, mode, layout, delta, overlapping, threshold, compare],
            [shown_input, overlay, summary, comparison, downloads],
            api_name="segment",
        )
    return page


def missing_checkpoint_page(message: str) -> gr.Blocks:
    """What the app serves without ``ckpt_path``: how to get a checkpoint."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}\n{message}", elem_id="summary")
    return page


def _segment(service: SegmentationService, path, choices: Choices, progress) -> tuple:
    """The page's outputs for one click; any failure becomes one message on the page."""
    if not path:
        raise gr.Error("Upload a photo, or pick an example, first.", print_exception=False)
    try:
        result = service.segment(path, choices, progress)
    except (UploadError, ConfigError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # never a stack trace on the page: one line, the trace in the log
        log.exception("segmenting %s failed", path)
        problem = str(err).splitlines()[0] if str(err) else ""
        raise gr.Error(
            f"{Path(path).name}: segmentation failed ({type(err).__name__}: {problem})",
            print_exception=False,
        ) from None
    crops = draw_boxes(result.image, result.entities.crop_boxes.tolist())
    comparison = (
        gr.update(value=service.shown(result.comparison), visible=True)
        if result.comparison is not None
        else gr.update(value=None, visible=False)
    )
    return (
        service.shown(crops),
        service.shown(result.overlay),
        f"**{result.summary()}**",
        comparison,
        [str(p) for p in result.downloads],
    )
