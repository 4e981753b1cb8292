"""Exported networks (ONNX, torch.export) compute what the PyTorch network computes, at sizes
they were not traced at, and fuse into the same entities through the library's one fusion path.
"""

import json

import onnx
import pytest
import torch
from hydra import compose, initialize_config_dir
from pycocotools import mask as mask_utils

from conftest import (
    SHARED_DATA,
    TINY_NET,
    Background,
    run_python,
    selected_in_module,
    tiny_model,
)
from entityseg import EntitySegmenter
from entityseg.config import CONFIG_DIR, ConfigError
from entityseg.data.coco_entity import read_rgb_image
from entityseg.data.views import ViewConfig, collate_views, prediction_views
from entityseg.export import OPSET, export_network
from entityseg.inference.exported import (
    METADATA_PREFIX,
    ExportedNetwork,
    OnnxNetwork,
)
from entityseg.inference.runner import run_modes
from entityseg.inference.settings import INFERENCE_MODES, InferenceSettings
from entityseg.interop.release import convert_release
from entityseg.models.outputs import TUPLE_NAMES, CropFormerOutput

#: Test views of the tiny network (fixed4: V = 5), short side 160 for the COCO photos.
VIEWS = ViewConfig(
    short_sizes=(160,),
    max_size=256,
    crop_layout="fixed4",
    crop_delta=0.7,
    flip_prob=0.0,
    pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375),
)
EXAMPLE_SIZE = (64, 96)  # traced at; checked at the sizes below
OTHER_SIZES = [(96, 128), (128, 64)]
CPU = torch.device("cpu")
SETTINGS = InferenceSettings()


@pytest.fixture(scope="module")
def net():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def onnx_files(net, tmp_path_factory) -> dict:
    """The tiny network exported once per mode: mode -> path."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for mode in ("image_o", "batch_oc"):
        paths[mode] = out / f"{mode}.onnx"
        export_network(net, paths[mode], "onnx", mode, VIEWS, "entityseg", EXAMPLE_SIZE)
    return paths


def random_images(views: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, views, 3, height, width, generator=generator)


def largest_differences(expected: CropFormerOutput, actual: CropFormerOutput) -> dict:
    """Max |actual - expected| of each final tensor, by ``to_tuple`` name."""
    assert len(actual.to_tuple()) == len(expected.to_tuple())
    return {
        name: (ours - theirs).abs().max().item()
        for name, ours, theirs in zip(
            TUPLE_NAMES, actual.to_tuple(), expected.to_tuple(), strict=False
        )
    }


@pytest.mark.parametrize("size", OTHER_SIZES)
@pytest.mark.parametrize("mode", ["image_o", "batch_oc"])
def test_onnx_outputs_equal_pytorchs_at_other_sizes(net, onnx_files, mode, size):
    exported = OnnxNetwork(onnx_files[mode])
    views = 1 if mode == "image_o" else 5
    batch_level = mode == "batch_oc"
    images = random_images(views, *size)
    with torch.inference_mode():
        expected = net(images, batch_level=batch_level)
    actual = exported(images, batch_level=batch_level)
    assert (actual.batch is None) == (not batch_level)
    assert actual.image.aux == []
    for ours, theirs in zip(actual.to_tuple(), expected.to_tuple(), strict=True):
        assert ours.shape == theirs.shape
    differences = largest_differences(expected, actual)
    assert max(differences.values()) < 1e-4, differences


def test_batch_file_runs_the_full_view_alone(net, onnx_files):
    """Image-O from a batch_oc file: V = 1 (the runner's full-view pass) is a valid input."""
    images = random_images(1, *OTHER_SIZES[0])
    with torch.inference_mode():
        expected = net(images, batch_level=False)
    actual = OnnxNetwork(onnx_files["batch_oc"])(images, batch_level=False)
    assert actual.batch is None
    assert max(largest_differences(expected, actual).values()) < 1e-4


def coco_batches(shared_data, views: ViewConfig) -> list[dict]:
    """One collated test batch per COCO photo, made as predict makes them."""
    batches = []
    paths = sorted((shared_data / "coco_panoptic_sample/images").glob("*.jpg"))
    for image_id, path in enumerate(paths, start=1):
        sample = prediction_views(read_rgb_image(path), views)
        sample.update(image_id=image_id, file_name=path.name, num_skipped=0)
        batches.append(collate_views([sample]))
    return batches


#: Pixels a fused mask may differ by: an untrained network has many pixels whose fused
#: probability sits at the 0.5 threshold, where any float rounding flips them (measured once:
#: 5 pixels of one Batch-O image through onnxruntime, 1-2 through torch.export's program,
#: whose outputs are within 2e-6 of eager's; the other masks identical)
FLIPPED_PIXELS = 10


def assert_same_entities(expected, actual, mode: str) -> None:
    """The same entities (queries, order), scores within 1e-5, masks within a few pixels."""
    assert len(expected) > 0
    assert actual.query_indices.tolist() == expected.query_indices.tolist(), mode
    assert actual.scores.tolist() == pytest.approx(expected.scores.tolist(), abs=1e-5), mode
    flipped = (actual.masks() ^ expected.masks()).flatten(1).sum(1)
    assert flipped.max().item() <= FLIPPED_PIXELS, (mode, flipped.tolist())


def test_fused_entities_through_onnx_equal_pytorchs(net, onnx_files, shared_data):
    batches = coco_batches(shared_data, VIEWS)
    expected = run_modes(net, batches, INFERENCE_MODES, CPU, SETTINGS, show_progress=False)
    from_batch_file = run_modes(
        OnnxNetwork(onnx_files["batch_oc"]),
        batches,
        INFERENCE_MODES,
        CPU,
        SETTINGS,
        show_progress=False,
    )
    from_image_file = run_modes(
        OnnxNetwork(onnx_files["image_o"]), batches, ["image_o"], CPU, SETTINGS, show_progress=False
    )
    compared = [(mode, from_batch_file[mode]) for mode in INFERENCE_MODES]
    compared.append(("image_o", from_image_file["image_o"]))
    for mode, actual in compared:
        assert actual.entities.keys() == expected[mode].entities.keys()
        for image_id, entities in expected[mode].entities.items():
            assert_same_entities(entities, actual.entities[image_id], mode)


@pytest.mark.parametrize("mode", ["image_o", "batch_oc"])
def test_onnx_graph_has_standard_ops_and_says_how_to_use_it(onnx_files, mode):
    model = onnx.load(onnx_files[mode])
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": OPSET}
    assert "GridSample" in {node.op_type for node in model.graph.node}  # deformable attention
    inputs = model.graph.input
    assert [i.name for i in inputs] == ["views"]
    dims = inputs[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3
    assert all(dims[k].dim_param for k in (0, 2, 3))  # V, H, W dynamic
    outputs = ["image_logits", "image_masks"]
    if mode == "batch_oc":
        outputs += ["batch_logits", "batch_masks"]
    assert [o.name for o in model.graph.output] == outputs
    metadata = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert metadata[METADATA_PREFIX + "mode"] == mode
    assert metadata[METADATA_PREFIX + "opset"] == OPSET
    exported = OnnxNetwork(onnx_files[mode])
    assert (exported.views, exported.mode, exported.compat) == (VIEWS, mode, "entityseg")
    assert exported.has_batch_decoder == (mode == "batch_oc")


def test_torch_export_round_trip_equals_eager(net, tmp_path):
    path = tmp_path / "tiny.pt2"
    info = export_network(net, path, "torch_export", "batch_oc", VIEWS, "entityseg", EXAMPLE_SIZE)
    assert info.opset is None
    exported = ExportedNetwork(path)
    assert (exported.views, exported.mode, exported.has_batch_decoder) == (VIEWS, "batch_oc", True)
    for views, size in [(5, OTHER_SIZES[0]), (2, OTHER_SIZES[1]), (1, EXAMPLE_SIZE)]:
        images = random_images(views, *size)
        with torch.inference_mode():
            expected = net(images)
        differences = largest_differences(expected, exported(images))
        assert max(differences.values()) < 1e-5, (views, size, differences)


def test_exported_network_refuses_unpadded_input(onnx_files):
    with pytest.raises(ValueError, match="multiples of 32"):
        OnnxNetwork(onnx_files["image_o"])(torch.zeros(1, 1, 3, 64, 70))


def test_a_file_without_our_metadata_is_refused_in_one_line(onnx_files, tmp_path):
    model = onnx.load(onnx_files["image_o"])
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a file written by python -m entityseg.export"):
        OnnxNetwork(tmp_path / "plain.onnx")


def test_hornet_is_refused_for_onnx_in_one_line(tmp_path):
    """HorNet's complex FFT has no ONNX translation in torch's exporter (torch_export works)."""
    from entityseg.models.cropformer import CropFormer

    config = {**TINY_NET, "backbone": dict(name="hornet_tiny_gf", base_dim=32, depths=(1, 1, 2, 1))}
    hornet = CropFormer(**config).eval()
    with pytest.raises(ConfigError, match="use format=torch_export"):
        export_network(hornet, tmp_path / "h.onnx", "onnx", "image_o", VIEWS, "entityseg")


def test_batch_oc_needs_the_batch_decoder(tmp_path):
    mask2former = tiny_model(enabled=False).eval()
    with pytest.raises(ConfigError, match="needs the batch decoder"):
        export_network(mask2former, tmp_path / "m.onnx", "onnx", "batch_oc", VIEWS, "entityseg")


def test_export_config_composes_with_an_experiment():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("export", overrides=["ckpt_path=x.ckpt", "experiment=demo"])
    assert (cfg.format, cfg.mode, cfg.output, cfg.check) == ("onnx", "batch_oc", None, True)
    assert list(cfg.example_size) == [256, 320]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tflite", "config error: format='tflite': unknown; expected one of"),
        ("mode=batch_o", "config error: mode='batch_o': unknown; expected one of"),
    ],
)
def test_cli_refuses_a_bad_format_or_mode_in_one_line(tmp_path, override, message):
    result = run_python(
        "-m", "entityseg.export", "ckpt_path=x.ckpt", override, f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


@pytest.fixture(scope="module", autouse=True)
def release_export_started(request, tmp_path_factory):
    """The CLI export of :func:`release_export`, started before this module's first test: its
    minute and a half of tracing (single-threaded Python, as the tiny network's exports above)
    runs on the second core meanwhile. None when no selected test needs it, or without the
    shared data (``release_export`` then skips or fails as ``shared_data`` says)."""
    if not (selected_in_module(request, "release_export") and SHARED_DATA.is_dir()):
        yield None
        return
    out = tmp_path_factory.mktemp("release_export")
    folder = SHARED_DATA / "official_reference/cropformer_tiny"
    checkpoint = out / "cropformer_tiny.ckpt"
    convert_release(folder / "model_final.pth", folder / "config.yaml", checkpoint)
    export = Background(
        "-m",
        "entityseg.export",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={out}/run",
        folder=out / "output",
    )
    yield export, out, folder
    export.stop()


@pytest.fixture(scope="module")
def release_export(shared_data, release_export_started) -> tuple:
    """The release's reduced CropFormer, converted and exported (batch_oc) by the CLI: (the
    finished process, the file, the release's folder)."""
    export, out, folder = release_export_started
    return export.result(), out / "run" / "cropformer_tiny_batch_oc.onnx", folder


@pytest.mark.slow
def test_cli_exports_a_converted_release_checkpoint(release_export):
    result, path, _ = release_export
    assert result.returncode == 0, result.stderr[-3000:]
    assert path.is_file()
    assert "exported vs PyTorch on random views at" in result.stdout + result.stderr
    exported = OnnxNetwork(path)
    assert (exported.mode, exported.compat, exported.has_batch_decoder) == (
        "batch_oc",
        "release",
        True,
    )
    assert exported.views.crop_resize == "own"  # the release's crop views, each its own size


@pytest.mark.slow
def test_exported_release_file_reproduces_the_releases_entities(release_export, shared_data):
    """``EntitySegmenter.from_onnx`` on the photos, as ``predict`` runs them
    (tests/interop/test_release.py): views of different sizes padded to one, Batch-OC fused
    with the file's compat (release)."""
    result, path, folder = release_export
    assert result.returncode == 0, result.stderr[-3000:]
    segmenter = EntitySegmenter.from_onnx(path)
    assert (segmenter.settings.mode, segmenter.settings.compat) == ("batch_oc", "release")
    images = shared_data / "coco_panoptic_sample/images"
    for record in json.loads((folder / "entities.json").read_text()):
        entities = segmenter(images / record["file_name"])
        assert len(entities) == len(record["scores"])
        for rle, score, expected_rle, expected_score in zip(
            entities.rles,
            entities.scores.tolist(),
            record["segmentations"],
            record["scores"],
            strict=True,
        ):
            ours = mask_utils.decode(rle).astype(bool)
            release = mask_utils.decode(expected_rle).astype(bool)
            # as predict: float rounding can flip a pixel whose fused probability is 0.5
            assert (ours ^ release).sum() <= 2
            assert score == pytest.approx(expected_score, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", INFERENCE_MODES)
def test_from_onnx_gives_from_checkpoints_entities(release_export, shared_data, mode):
    """The API on an exported file and on its checkpoint: the same entities of both photos."""
    result, path, _ = release_export
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = path.parents[1] / "cropformer_tiny.ckpt"
    photos = sorted((shared_data / "coco_panoptic_sample/images").glob("*.jpg"))
    expected = EntitySegmenter.from_checkpoint(checkpoint, mode=mode, device="cpu")(photos)
    actual = EntitySegmenter.from_onnx(path, mode=mode)(photos)
    for want, got in zip(expected, actual, strict=True):
        assert_same_entities(want, got, mode)
