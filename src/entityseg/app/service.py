"""What the web demo does, without the page: read an upload, segment it, draw it, write its
downloads.

Plain Python on :class:`~entityseg.api.EntitySegmenter` (the one inference path), so that the
downloads are what ``predict`` writes for the same image and settings: its 16-bit entity-id
PNG and overlay JPEG (:func:`~entityseg.inference.writing.write_pictures`) and its COCO
records (:func:`~entityseg.inference.writing.prediction_records`, image id 1 as for a
one-image input). The page (:mod:`entityseg.app.page`) only lays this out.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entityseg.api import EntitySegmenter
from entityseg.data.coco_entity import open_image, read_rgb_image
from entityseg.data.errors import EntityDataError
from entityseg.inference.compare import ModeComparison, compare_entities
from entityseg.inference.fusion import Entities
from entityseg.inference.settings import INFERENCE_MODES, PAPER_NAMES
from entityseg.inference.writing import picture_paths, prediction_records, write_pictures
from entityseg.viz import (
    draw_boxes,
    fit_within,
    highlight_entities,
    id_map_from_rles,
    labelled,
    overlay_id_map,
    side_by_side,
)

#: (fraction done, what runs now): how the page shows progress (``gr.Progress`` is one).
Progress = Callable[..., object]


class UploadError(ValueError):
    """An upload that cannot be segmented, in one line naming the file (shown on the page)."""


@dataclass(frozen=True)
class Choices:
    """What a user chooses on the page; :attr:`SegmentationService.defaults` are the
    checkpoint's."""

    mode: str = "batch_oc"
    crop_layout: str = "fixed4"
    crop_delta: float = 0.7
    overlapping: bool = False
    score_threshold: float = 0.0
    compare: bool = False  # Image-O beside Batch-OC as well


@dataclass
class Segmentation:
    """One upload's entities in the chosen mode, the pictures and the download files."""

    file_name: str
    image: np.ndarray  # uint8 [H, W, 3], as predict reads the file
    entities: Entities
    overlay: np.ndarray  # predict's overlay picture (crop boxes drawn)
    seconds: float  # network and fusion, every mode run
    downloads: list[Path]  # entity-id PNG, overlay JPEG, COCO results json
    mode: str = "batch_oc"
    comparison: np.ndarray | None = None  # Image-O | Batch-OC with what the crops recovered
    image_o_count: int | None = None
    compared: ModeComparison | None = None  # Batch-OC against Image-O

    def summary(self) -> str:
        """One line for the page: the entity count, the time, and what the crops changed."""
        line = f"{len(self.entities)} entities ({PAPER_NAMES[self.mode]}) in {self.seconds:.2f} s"
        if self.compared is not None:
            counts = self.compared.counts()
            line += (
                f"; Image-O finds {self.image_o_count}; Batch-OC recovers {counts['recovered']} "
                "(mostly outside every Image-O entity), merges "
                f"{counts['merged']} and splits {counts['split']}"
            )
        return line


def read_upload(path: str | Path, max_megapixels: float) -> np.ndarray:
    """The upload as uint8 RGB [H, W, 3], read as ``predict`` reads files.

    Only the Pillow plugins of the formats entityseg reads open it
    (:func:`~entityseg.data.coco_entity.open_image`): a PostScript file named ``photo.jpg``
    never reaches the others. Raises :class:`UploadError` naming the file (never its server
    path) for a file that is not a readable image of those formats, or whose pixel count (read
    from its header, before decoding) is above ``max_megapixels``.
    """
    path = Path(path)
    try:
        with open_image(path) as img:
            width, height = img.size
        megapixels = width * height / 1e6
        if megapixels > max_megapixels:
            raise UploadError(
                f"{path.name}: {width}x{height} is {megapixels:.3g} megapixels, above this "
                f"demo's limit of {max_megapixels:g} (app.max_megapixels)"
            )
        return read_rgb_image(path)
    except EntityDataError as err:
        problem = err.problem.replace(str(path), path.name)  # the server's paths stay there
        raise UploadError(f"{path.name}: {problem}") from None


def comparison_picture(
    image: np.ndarray, image_o: Entities, batch_oc: Entities, compared: ModeComparison
) -> np.ndarray:
    """Image-O's entities beside Batch-OC's, the entities Batch-OC recovered in colour (ringed
    in yellow) and the others outlined, the crops drawn."""
    height, width = image.shape[:2]
    recovered = compared.recovered
    left = overlay_id_map(image, id_map_from_rles(image_o.rles, height, width))
    right = highlight_entities(
        image, id_map_from_rles(batch_oc.rles, height, width), [k + 1 for k in recovered]
    )
    right = draw_boxes(right, batch_oc.crop_boxes.tolist())
    return side_by_side(
        [
            labelled(left, f"Image-O: {len(image_o)}"),
            labelled(right, f"Batch-OC: {len(recovered)} recovered"),
        ]
    )


class SegmentationService:
    """Uploads in, :class:`Segmentation` out, with one :class:`EntitySegmenter`.

    ``max_megapixels``: the largest upload segmented; ``workdir``: where each request's
    downloads are written (a folder per request; the oldest beyond ``keep_results`` are
    deleted, so a long-running server does not fill its disk); ``display_side``: the longest
    side of the pictures shown on the page (the downloads keep the full size).
    """

    def __init__(
        self,
        segmenter: EntitySegmenter,
        workdir: str | Path,
        max_megapixels: float = 50,
        keep_results: int = 32,
        display_side: int = 1600,
    ) -> None:
        self.segmenter = segmenter
        self.workdir = Path(workdir)
        self.max_megapixels = max_megapixels
        self.keep_results = keep_results
        self.display_side = display_side
        #: the Table 7 modes this network runs (Image-O only for a Mask2Former network)
        self.modes = segmenter.usable_modes(INFERENCE_MODES)
        self._results: list[Path] = []

    @property
    def can_overlap(self) -> bool:
        """Whether overlapping masks can be asked for (not under ``compat=release``, whose
        entities never overlap)."""
        return self.segmenter.settings.compat != "release"

    @property
    def defaults(self) -> Choices:
        """The checkpoint's mode, crops and fusion settings."""
        views, settings = self.segmenter.views, self.segmenter.settings
        return Choices(
            mode=settings.mode,
            crop_layout=views.crop_layout,
            crop_delta=views.crop_delta,
            overlapping=settings.overlapping,
            score_threshold=settings.score_threshold,
        )

    def segmenter_for(self, choices: Choices) -> EntitySegmenter:
        """The segmenter with these choices (the same network)."""
        return self.segmenter.replace(
            mode=choices.mode,
            test_crop_layout=choices.crop_layout,
            crop_delta=float(choices.crop_delta),
            overlapping=bool(choices.overlapping),
            score_threshold=float(choices.score_threshold),
        )

    def segment(
        self, path: str | Path, choices: Choices, progress: Progress | None = None
    ) -> Segmentation:
        """Segment the upload at ``path``; :class:`UploadError` or
        :class:`~entityseg.config.ConfigError` (a bad choice) in one line."""
        report = progress or (lambda *args, **kwargs: None)
        name = Path(path).name
        report(0.0, desc=f"reading {name}")
        image = read_upload(path, self.max_megapixels)
        segmenter = self.segmenter_for(choices)
        mode = segmenter.settings.mode
        modes = [mode]
        compare = choices.compare and "batch_oc" in self.modes
        if compare:
            modes += [m for m in ("image_o", "batch_oc") if m != mode]
        report(0.1, desc=f"{', '.join(PAPER_NAMES[m] for m in modes)}: network and fusion")
        start = time.perf_counter()
        per_mode = segmenter.segment_modes(image, modes)
        seconds = time.perf_counter() - start
        entities = per_mode[mode]

        report(0.8, desc="writing the downloads")
        folder = self._new_folder()
        stem = Path(name).stem
        overlay = write_pictures(image, entities, folder, stem)
        records = folder / f"{stem}_predictions.json"
        records.write_text(json.dumps(prediction_records(entities, 1, name)))
        id_png, overlay_jpg = picture_paths(folder, stem)
        result = Segmentation(
            file_name=name,
            image=image,
            entities=entities,
            overlay=overlay,
            seconds=seconds,
            downloads=[id_png, overlay_jpg, records],
            mode=mode,
        )
        if compare:
            report(0.9, desc="comparing Image-O with Batch-OC")
            compared = compare_entities(per_mode["batch_oc"], per_mode["image_o"])
            result.comparison = comparison_picture(
                image, per_mode["image_o"], per_mode["batch_oc"], compared
            )
            result.image_o_count = len(per_mode["image_o"])
            result.compared = compared
        return result

    def shown(self, picture: np.ndarray) -> np.ndarray:
        """A picture at the page's size."""
        return fit_within(picture, self.display_side)

    def _new_folder(self) -> Path:
        folder = self.workdir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        self._results.append(folder)
        while len(self._results) > self.keep_results:
            shutil.rmtree(self._results.pop(0), ignore_errors=True)
        return folder
