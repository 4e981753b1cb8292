"""scripts/benchmark.py runs at a tiny size and writes rows with every key of its contract."""

import importlib.util
import json
import sys

import pytest

from conftest import REPO, Background, run_python, selected_in_module

CONTRACT_KEYS = {
    "impl",
    "task",
    "mode",
    "views",
    "device",
    "precision",
    "height",
    "width",
    "threads",
    "median_ms",
    "min_ms",
    "max_ms",
    "peak_mem_mb",
}
TINY = [
    "--backbone", "swin_tiny", "--experiment", "demo",  # Swin-T, the demo's small heads
    "--height", "64", "--width", "96", "--runs", "1", "--warmup", "0", "--threads", "1",
]  # fmt: skip
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run_benchmark(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = run_python(
        "scripts/benchmark.py",
        *TINY,
        *args,
        "--json",
        str(out),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def load_script():
    """scripts/benchmark.py as a module (registered: its dataclasses look themselves up)."""
    name = "entityseg_benchmark_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "benchmark.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.slow
def test_benchmark_rows_have_the_contract_keys_and_positive_times(tmp_path):
    rows, stdout = run_benchmark(
        tmp_path,
        "--views", "1", "5",
        "--tasks", "forward", "end_to_end", "train_step", "dataloader", "predict_memory",
        "--loader-images", "4", "--loader-size", "96", "128",
        "--high-res-size", "120", "160",
        "--overrides", "data.test_short_size=64", "data.test_max_size=96",
    )  # fmt: skip
    for row in rows:
        assert row.keys() >= CONTRACT_KEYS, row
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row["peak_mem_mb"] >= 0 and row["threads"] == 1, row
        assert (row["device"], row["precision"]) == ("cpu", "fp32")
    found = {(r["impl"], r["task"], r["mode"], r["views"]) for r in rows}
    assert found >= {
        ("entityseg", "forward", "image_o", 1),
        ("entityseg", "forward", "batch_oc", 5),
        ("entityseg", "end_to_end", "image_o", 1),
        ("entityseg", "end_to_end", "batch_oc", 5),
        ("entityseg", "train_step", "train", 2),
        ("entityseg", "dataloader", "train", 2),
        ("entityseg", "predict_memory", "batch_oc", 9),
    }
    hf_rows = {key for key in found if key[0] == "hf_mask2former"}
    if HAS_TRANSFORMERS:
        assert hf_rows == {("hf_mask2former", "forward", "image_o", 1)}
    else:  # CI: no bench extra
        assert not hf_rows and "transformers is not installed" in stdout
    assert "| entityseg | forward | image_o | 1 | 64x96 | cpu | fp32 | 1 |" in stdout
    assert "data loading:" in stdout


def test_predict_throughput_rows_time_both_paths_on_the_same_photos(tmp_path):
    rows, stdout = run_benchmark(
        tmp_path,
        "--backbone", "tiny",  # after TINY's swin_tiny: the quickest network to load and run
        "--tasks", "predict_throughput", "--photos", "2", "--no-hf",
        "--predict-workers", "0", "--predict-processes", "1",
        "--overrides", "data.test_short_size=64", "data.test_max_size=96",
    )  # fmt: skip
    assert [(r["path"], r["processes"], r["num_workers"]) for r in rows] == [
        ("sequential", 1, 0),
        ("lightning", 1, 0),
    ]
    for row in rows:
        assert row.keys() >= CONTRACT_KEYS and row["images"] == 2, row
        assert row["median_ms"] == pytest.approx(1000 / row["images_per_s"], rel=1e-3), row
    assert rows[1]["peak_mem_mb"] > 0  # rank 0's peak, from predict's summary line
    assert "predict throughput: sequential (1 process(es), 0 workers)" in stdout


def test_without_transformers_the_hf_model_is_skipped(monkeypatch, capsys):
    benchmark = load_script()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert benchmark.build_hf_model(cfg=None, device=None) is None
    assert "transformers is not installed" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs the bench extra (transformers)")
def test_hf_config_mirrors_the_release_sizes():
    benchmark = load_script()
    cfg = benchmark.compose_config(benchmark.parse_args(["--backbone", "swin_large"]))
    config = benchmark.hf_mask2former_config(cfg)
    swin = config.backbone_config
    assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size) == (
        192, [2, 2, 18, 2], [6, 12, 24, 48], 7,
    )  # fmt: skip
    assert (config.num_labels, config.num_queries, config.hidden_dim) == (1, 100, 256)
    assert (config.mask_feature_size, config.encoder_layers, config.decoder_layers) == (256, 6, 10)


def test_profile_parts_times_every_part_and_writes_kernel_tables(tmp_path):
    kernels = tmp_path / "kernels.txt"
    result = run_python(
        "scripts/profile_parts.py",
        "--backbone", "tiny", "--height", "64", "--width", "96", "--runs", "1",
        "--warmup", "0", "--threads", "1", "--views", "1", "5", "--no-hf",
        "--kernels", kernels,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for part in ("backbone", "pixel decoder", "image decoder", "whole forward"):
        assert result.stdout.count(f"  {part} ") == 2, (part, result.stdout)
    assert result.stdout.count("association + batch decoder") == 1  # 5 views only
    tables = kernels.read_text()
    assert "## entityseg, 1 view(s)" in tables and "## entityseg, 5 view(s)" in tables
    assert "aten::" in tables


@pytest.fixture(scope="module", autouse=True)
def onnx_run_started(request, tmp_path_factory):
    """The benchmark run of :func:`onnx_run`, started before this module's first test: its
    ONNX export (20 s of single-threaded tracing) runs beside the other tests' runs, which
    use one thread too. None when no selected test needs it."""
    if not selected_in_module(request, "onnx_run"):
        yield None
        return
    out = tmp_path_factory.mktemp("onnx_run")
    # Image-O only, of one-layer decoders: one export of a small graph (tests/test_export.py
    # checks the exported files of both modes against PyTorch; here only the rows count)
    run = Background(
        "scripts/benchmark.py",
        "--backbone", "tiny", "--experiment", "demo", "--height", "64", "--width", "96",
        "--runs", "1", "--warmup", "0", "--threads", "1", "--tasks", "forward",
        "--views", "1", "--onnx", "--no-hf", "--json", out / "bench.json", "--overrides",
        "model.net.pixel_decoder.num_layers=1", "model.net.decoder.num_layers=1",
        folder=out,
    )  # fmt: skip
    yield run, out / "bench.json"
    run.stop()


@pytest.fixture(scope="module")
def onnx_run(onnx_run_started):
    """scripts/benchmark.py with ``--onnx``: (the finished process, its json)."""
    run, out = onnx_run_started
    return run.result(), out


@pytest.mark.slow
def test_onnx_rows_beside_the_pytorch_rows(onnx_run):
    result, out = onnx_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["impl"], r["mode"], r["views"]) for r in rows} == {
        ("entityseg", "image_o", 1),
        ("onnxruntime", "image_o", 1),
    }
    for row in rows:
        assert row.keys() >= CONTRACT_KEYS and row["median_ms"] > 0, row
        if row["impl"] == "onnxruntime":
            assert row["opset"] == 18 and row["export_s"] > 0, row


def test_onnx_rows_need_the_cpu_in_fp32():
    benchmark = load_script()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--onnx", "--precision", "bf16"])
