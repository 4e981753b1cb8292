"""LightningDataModule: COCO entity json + images -> batches of CropFormer views.

Training batches hold V = 2 views (I^O and one crop I^C) with per-view targets; validation and
test batches hold V = 1 + k views (k = 4 or 8 fixed crops) and the image ids that the AP^e
evaluation looks up in the json. With ``synthetic`` set, the embedded synthetic data set is
generated on first use (``prepare_data``), so quick runs need no download. Training may read
several parts, each a json with its own image folder (EntitySeg's three parts, as released).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from entityseg.config import ConfigError
from entityseg.data.coco_entity import EntityImage, load_entity_json
from entityseg.data.crops import CROP_LAYOUTS
from entityseg.data.photometric import PHOTOMETRIC_PIPELINES
from entityseg.data.synthetic import generate_dataset
from entityseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, scaled_sizes
from entityseg.data.views import (
    AUGMENTATIONS,
    CROP_RESIZE_MODES,
    EntityViewsDataset,
    ViewConfig,
    collate_views,
)

log = logging.getLogger(__name__)

#: The release's training short sides (640..800, step 32).
RECIPE_TRAIN_SHORT_SIZES = tuple(range(640, 801, 32))
#: Which copy of a validation set ``val_json`` / ``val_images`` are (EntitySeg has both).
RESOLUTIONS = ("high", "low")


class EntityDataModule(L.LightningDataModule):
    """Entity segmentation data for CropFormer.

    Args:
        train_json, train_images: COCO entity json and image folder for training; or lists of
            them, one folder per json (parts read together; their image ids must differ), or
            one folder for every json.
        val_json, val_images: the same for validation (and test unless ``test_json`` is given).
        resolution: ``high`` or ``low``: which copy of the validation set ``val_json`` /
            ``val_images`` are (the ``data=entityseg`` config picks the files by it); recorded
            with the run, ``None`` where a data set has one copy.
        synthetic: if set, ``{"num_train", "num_val", "seed", "height", "width"}`` and
            optionally ``num_objects`` / ``num_small``: the train and val sets are generated
            into the folders of ``train_json`` / ``val_json`` when their json is missing.
        batch_size, val_batch_size, num_workers: loader settings (``batch_size`` per device).
        global_batch_size: the batch over all devices and nodes (the release's
            ``SOLVER.IMS_PER_BATCH``); ``entityseg.train`` sets ``batch_size`` from it and the
            trainer's world size. Unused here; ``None``: ``batch_size`` as given.
        pin_memory: page-locked batches (faster copies to a GPU; ignored without one).
        persistent_workers: keep the loader workers between epochs (with ``num_workers > 0``).
        crop_delta: crop ratio delta of width and height.
        train_crop_layout: ``random``, ``fixed4`` or ``fixed8`` (one crop is used per image).
        test_crop_layout: ``fixed4``, ``fixed8`` or ``grid`` (all crops are used).
        test_crop_resize: ``same`` (every test view at the full view's size) or ``own`` (each
            crop by its own shortest edge, as the release; set by ``inference.compat=release``).
        train_crop_resize: the same for the training crop (``own``: as the release trains).
        keep_invisible_entities: keep an entity as a (batch-level) target even when no training
            view shows it, as the release does (``False``: left out).
        train_augmentation: ``crop_views`` (I^O and one crop, the sizes below) or ``lsj`` (the
            Mask2Former baselines' large-scale jitter: a square ``lsj_image_size`` view of the
            image scaled by a factor drawn from ``lsj_scale``, no crop view).
        lsj_image_size, lsj_scale: large-scale jitter's output side (times ``size_scale``) and
            the (min, max) of its random scale.
        lsj_mask_pad_value: entity masks in the large-scale-jitter padding: 0 (no entity) or 1
            (every entity, as the release's detectron2 pads instance masks with 255).
        train_short_sizes, train_max_size, test_short_size, test_max_size: resize recipe, all
            multiplied by ``size_scale`` (1.0 = the release; smaller for CPU runs).
        flip_prob: probability of a horizontal flip of both views at train time.
        size_divisibility: batches are zero-padded to a multiple of it.
        pixel_mean, pixel_std: normalisation in 0..255 RGB (the backbone's).
        skip_empty_train: leave images without entities out of training (kept for evaluation).
        strict: fail on bad input instead of logging and counting a skip.
        seed: seed of the per-sample random generators.
        photometric: ``None`` (off, the default and every release experiment) or ``default``:
            an optional photometric augmentation of the training images for small data sets of
            one's own (:mod:`entityseg.data.photometric`: brightness, contrast, colour, gamma,
            noise, blur; one draw per image, shared by all its views). Never at evaluation.
        for_training: ``False`` for a run that does not train (``entityseg.evaluate``): the
            training set's paths are then neither checked nor generated.
    """

    def __init__(
        self,
        train_json: str | Sequence[str],
        train_images: str | Sequence[str],
        val_json: str,
        val_images: str,
        test_json: str | None = None,
        test_images: str | None = None,
        synthetic: dict | None = None,
        resolution: str | None = None,
        batch_size: int = 2,
        global_batch_size: int | None = None,
        val_batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_delta: float = 0.7,
        train_crop_layout: str = "fixed4",
        test_crop_layout: str = "fixed4",
        test_crop_resize: str = "same",
        train_crop_resize: str = "same",
        keep_invisible_entities: bool = False,
        train_augmentation: str = "crop_views",
        lsj_image_size: int = 1024,
        lsj_scale: Sequence[float] = (0.1, 2.0),
        lsj_mask_pad_value: int = 0,
        train_short_sizes: Sequence[int] = RECIPE_TRAIN_SHORT_SIZES,
        train_max_size: int = 1333,
        test_short_size: int = 800,
        test_max_size: int = 1333,
        size_scale: float = 1.0,
        flip_prob: float = 0.5,
        size_divisibility: int = 32,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        skip_empty_train: bool = True,
        strict: bool = False,
        seed: int = 0,
        photometric: str | None = None,
        for_training: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.test_views = ViewConfig.from_keys(self.hparams, others="ignore", prefix="")
        self._check_arguments()
        hp = self.hparams
        common = dict(
            crop_delta=float(crop_delta),
            pixel_mean=tuple(float(v) for v in pixel_mean),
            pixel_std=tuple(float(v) for v in pixel_std),
        )
        self.train_views = ViewConfig(
            short_sizes=tuple(scaled_sizes(train_short_sizes, size_scale)),
            max_size=scaled_sizes([train_max_size], size_scale)[0],
            crop_layout=train_crop_layout,
            flip_prob=float(flip_prob),
            crop_resize=train_crop_resize,
            augmentation=train_augmentation,
            lsj_image_size=scaled_sizes([lsj_image_size], size_scale)[0],
            lsj_scale=(float(lsj_scale[0]), float(lsj_scale[1])),
            lsj_mask_pad_value=int(lsj_mask_pad_value),
            keep_invisible_entities=bool(keep_invisible_entities),
            **common,
        )
        self.collate = partial(collate_views, size_divisibility=hp.size_divisibility)
        self.datasets: dict[str, EntityViewsDataset] = {}

    def _check_arguments(self) -> None:
        hp = self.hparams
        for key, allowed, what in (
            ("train_crop_layout", CROP_LAYOUTS, "crop layout"),
            ("train_crop_resize", CROP_RESIZE_MODES, "crop resize"),
            ("train_augmentation", AUGMENTATIONS, "augmentation"),
            ("resolution", (None, *RESOLUTIONS), "resolution"),
            ("photometric", (None, *PHOTOMETRIC_PIPELINES), "photometric pipeline"),
        ):
            if hp[key] not in allowed:
                raise ConfigError(key, hp[key], f"unknown {what}; expected one of {allowed}")
        for key in ("batch_size", "val_batch_size", "size_divisibility", "lsj_image_size"):
            if not _positive_int(hp[key]):
                raise ConfigError(key, hp[key], "must be a positive integer")
        if hp.global_batch_size is not None and not _positive_int(hp.global_batch_size):
            raise ConfigError(
                "global_batch_size", hp.global_batch_size, "must be a positive integer or null"
            )
        if not isinstance(hp.keep_invisible_entities, bool):
            raise ConfigError(
                "keep_invisible_entities", hp.keep_invisible_entities, "must be true or false"
            )
        if hp.lsj_mask_pad_value not in (0, 1):
            raise ConfigError("lsj_mask_pad_value", hp.lsj_mask_pad_value, "must be 0 or 1")
        scale = hp.lsj_scale
        if not (
            isinstance(scale, Sequence)
            and len(scale) == 2
            and all(isinstance(v, int | float) for v in scale)
            and 0 < scale[0] <= scale[1]
        ):
            raise ConfigError("lsj_scale", scale, "must be [min, max] with 0 < min <= max")
        if not isinstance(hp.num_workers, int) or hp.num_workers < 0:
            raise ConfigError("num_workers", hp.num_workers, "must be an integer >= 0")
        if not 0.0 <= hp.flip_prob <= 1.0:
            raise ConfigError("flip_prob", hp.flip_prob, "must be in [0, 1]")
        if not hp.train_short_sizes:
            raise ConfigError("train_short_sizes", hp.train_short_sizes, "must not be empty")
        parts = self._train_parts() if hp.for_training else []
        if hp.synthetic is None:
            if hp.val_json is None or hp.val_images is None:
                key = "val_json" if hp.val_json is None else "val_images"
                raise ConfigError(
                    key, None, "is required: the validation set's annotation json and its images"
                )
            for key, paths, exists, what in (
                ("train_json", [j for j, _ in parts], Path.is_file, "annotation file"),
                ("val_json", [hp.val_json], Path.is_file, "annotation file"),
                ("test_json", [hp.test_json], Path.is_file, "annotation file"),
                ("train_images", [d for _, d in parts], Path.is_dir, "image folder"),
                ("val_images", [hp.val_images], Path.is_dir, "image folder"),
                ("test_images", [hp.test_images], Path.is_dir, "image folder"),
            ):
                for path in paths:
                    if path is not None and not exists(Path(path)):
                        raise ConfigError(key, path, f"{what} not found")

    def _train_parts(self) -> list[tuple[str, str]]:
        """The training set's (json, image folder) pairs: one, or one per part."""
        hp = self.hparams
        jsons, folders = _as_paths(hp.train_json), _as_paths(hp.train_images)
        for key, paths in (("train_json", jsons), ("train_images", folders)):
            if hp[key] is None:
                raise ConfigError(
                    key, None, "is required: the training set's annotation json(s) and images"
                )
            if paths is None:
                raise ConfigError(key, hp[key], "must be a path or a list of paths")
        if len(folders) == 1:
            folders = folders * len(jsons)
        if len(folders) != len(jsons):
            raise ConfigError(
                "train_images",
                hp.train_images,
                f"{len(folders)} image folders for {len(jsons)} annotation files "
                "(train_json): give one per json, or one for all",
            )
        return list(zip(jsons, folders, strict=True))

    def _train_records(self) -> list[EntityImage]:
        """Every training image of every part, in order; image ids must differ across parts."""
        records: list[EntityImage] = []
        first_json: dict[int, str] = {}
        for json_path, image_dir in self._train_parts():
            part = load_entity_json(json_path, image_dir)
            for record in part:
                seen = first_json.setdefault(record.image_id, json_path)
                if seen != json_path:
                    raise ConfigError(
                        "train_json",
                        self.hparams.train_json,
                        f"image id {record.image_id} is in both {seen} and {json_path}: parts "
                        "need distinct image ids (or train on one json that holds them all)",
                    )
            records.extend(part)
        return records

    def prepare_data(self, splits: Sequence[str] = ("train", "val")) -> None:
        """Generate the synthetic train/val sets (``splits`` of them: the web app's examples
        need only ``val``) if configured and not on disk yet."""
        syn = self.hparams.synthetic
        if syn is None:
            return
        for split, json_path, offset in (
            ("train", self.hparams.train_json, 0),
            ("val", self.hparams.val_json, 1),
        ):
            unused = split == "train" and not self.hparams.for_training
            if split not in splits or unused or Path(json_path).is_file():
                continue
            _check_synthetic_target(f"{split}_json", Path(json_path))
            log.info("generating the synthetic %s set in %s", split, Path(json_path).parent)
            generate_dataset(
                Path(json_path).parent,
                num_images=int(syn[f"num_{split}"]),
                seed=int(syn["seed"]) + offset,
                height=int(syn["height"]),
                width=int(syn["width"]),
                **{k: int(syn[k]) for k in ("num_objects", "num_small") if k in syn},
                show_progress=True,
            )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and "train" not in self.datasets:
            records = self._train_records()
            if hp.skip_empty_train:
                kept = [r for r in records if r.annotations]
                if len(kept) < len(records):
                    log.info(
                        "training on %d of %d images: %d have no entity",
                        len(kept),
                        len(records),
                        len(records) - len(kept),
                    )
                records = kept
            self.datasets["train"] = EntityViewsDataset(
                records,
                self.train_views,
                train=True,
                strict=hp.strict,
                seed=hp.seed,
                photometric=hp.photometric,
            )
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._eval_dataset(hp.val_json, hp.val_images)
        if stage in (None, "test", "predict") and "test" not in self.datasets:
            self.datasets["test"] = self._eval_dataset(
                hp.test_json or hp.val_json, hp.test_images or hp.val_images
            )

    def _eval_dataset(self, json_path: str, image_dir: str) -> EntityViewsDataset:
        records = load_entity_json(json_path, image_dir)
        return EntityViewsDataset(records, self.test_views, train=False, seed=self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.val_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test set (``evaluate`` runs on ``Trainer.predict``)."""
        return self.test_dataloader()

    def _loader(
        self, split: str, batch_size: int, shuffle: bool = False, drop_last: bool = False
    ) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            collate_fn=self.collate,
        )


def _check_synthetic_target(key: str, json_path: Path) -> None:
    """Generate a synthetic set only where it cannot be a user's data: as
    ``<folder>/annotations.json`` into a new or empty folder. A missing path of one's own (a
    typo: ``mydata/instance.json``) stops in one line naming the key, and writes nothing."""
    folder = json_path.parent
    if json_path.name != "annotations.json" or (folder.exists() and any(folder.iterdir())):
        raise ConfigError(
            f"data.{key}",
            str(json_path),
            "annotation file not found (a synthetic set is generated only as annotations.json "
            f"into a new or empty folder, and {folder} is not one: check the path, or use "
            "data=coco for data of your own)",
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_paths(value: object) -> list[str] | None:
    """A path or a non-empty list of paths as a list of strings; ``None`` if neither."""
    if isinstance(value, str | Path):
        return [str(value)]
    if isinstance(value, Sequence) and value and all(isinstance(v, str | Path) for v in value):
        return [str(v) for v in value]
    return None
