"""bf16 inference and training, and the compiled backbone + pixel decoder, on the CPU."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import REPO, make_datamodule, run_python, tiny_model
from entityseg.config import ConfigError, instantiate_checked
from entityseg.data.synthetic import generate_dataset
from entityseg.inference.runner import fuse_modes, inference_precision, run_modes
from entityseg.inference.settings import InferenceSettings
from entityseg.losses.criterion import CropFormerCriterion
from entityseg.models.checkpoint import load_weights
from entityseg.models.cropformer import CropFormer
from entityseg.models.outputs import CropFormerOutput, DecoderOutput
from entityseg.training import train
from test_train import config as train_config

MODES = ["image_o", "batch_oc"]
TRAIN_STEPS = 100


def tiny_net() -> CropFormer:
    return tiny_model(num_queries=16)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    """Four scenes of about ten entities each, at network sizes of about 100 x 130."""
    root = tmp_path_factory.mktemp("precision")
    generate_dataset(root, num_images=4, seed=5, height=192, width=256, num_objects=3, num_small=4)
    dm = make_datamodule(root, batch_size=2, size_scale=0.1, flip_prob=0.0)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.fixture(scope="module")
def trained(datamodule):
    """A tiny CropFormer after ``TRAIN_STEPS`` steps on the four scenes (about 10 s), learning
    rate decayed to 0: masks that are not trivial (an untrained net's mask logits sit near 0,
    where any rounding flips a pixel).

    One thread: the same weights whatever the machine's thread count (the summation order
    changes with it, and 100 steps amplify that), and much faster on a shared 2-core machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the training crops
        net = tiny_net()
        criterion = CropFormerCriterion(num_points=256)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / TRAIN_STEPS)
        losses = []
        while len(losses) < TRAIN_STEPS:
            for batch in datamodule.train_dataloader():
                loss = criterion(net(batch["images"]), batch["targets"])["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if len(losses) == TRAIN_STEPS:
                    break
    finally:
        torch.set_num_threads(threads)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses  # it learned something
    return net.eval()


def mask_overlaps(fp32, bf16) -> list[tuple[int, int]]:
    """(intersection, union) in pixels of the entity of each query index in either result (a
    query only one result has counts its whole mask as union)."""
    overlaps = []
    for image_id, reference in fp32.entities.items():
        other = bf16.entities[image_id]
        masks_a = dict(zip(reference.query_indices.tolist(), reference.masks(), strict=True))
        masks_b = dict(zip(other.query_indices.tolist(), other.masks(), strict=True))
        for query in masks_a.keys() | masks_b.keys():
            a, b = masks_a.get(query), masks_b.get(query)
            if a is None or b is None:
                overlaps.append((0, int((a if b is None else b).sum())))
            else:
                overlaps.append((int((a & b).sum()), int((a | b).sum())))
    return overlaps


def test_bf16_predictions_keep_the_fp32_masks(trained, datamodule):
    """Each query's fused mask (``overlapping=True``) with bf16 against fp32: the
    area-weighted mean IoU (summed intersections over summed unions) is >= 0.95.

    Area-weighted, because this tiny model's masks have regions whose logits sit near 0, where
    bf16 rounding legitimately moves pixels: an 18-pixel speck changed by half its area (IoU
    0.36) on one training run, a 5,000-pixel entity by a quarter (IoU 0.77) on another, while
    the area-weighted IoU stayed at 0.99; a plain mean over a dozen entities swings with such
    single cases.

    Without ``overlapping`` a query's final mask also depends on the painting order, which
    near-tied entity scores decide; bf16 moves scores by up to ~0.04, so on this tiny model
    whole regions change owner (per-query mean IoU 0.75-0.99 over seeds) while each query's own
    mask stays put.

    PyTorch's own CPU kernels, not oneDNN's: on CPUs with AMX (Sapphire Rapids and later)
    oneDNN's bf16 kernels leave about twice the logit error (0.0065 against 0.0034 of the fp32
    logits' norm, measured once), enough to push one near-threshold query of this tiny model
    from 1 to 28,895 pixels (Batch-OC area-weighted IoU 0.85, 0.99 without oneDNN); elsewhere
    both give the same. The test checks our bf16 policy, the same on every host.
    """
    batches = list(datamodule.test_dataloader())
    with torch.backends.mkldnn.flags(enabled=False):
        results = {
            precision: run_modes(
                trained,
                batches,
                MODES,
                torch.device("cpu"),
                InferenceSettings(overlapping=True, precision=precision),
                show_progress=False,
            )
            for precision in ("fp32", "bf16")
        }
    for mode in MODES:
        overlaps = mask_overlaps(results["fp32"][mode], results["bf16"][mode])
        weighted = sum(i for i, _ in overlaps) / sum(u for _, u in overlaps)
        print(f"{mode}: bf16 vs fp32 area-weighted IoU {weighted:.4f} over {len(overlaps)}")
        assert len(overlaps) >= 8 and weighted >= 0.95, (mode, overlaps)


def test_bf16_runs_the_network_in_bf16_and_fuses_in_float32(trained, datamodule):
    batch = next(iter(datamodule.test_dataloader()))
    bf16 = InferenceSettings(precision="bf16")
    with torch.no_grad(), inference_precision("cpu", bf16):
        outputs = trained(batch["images"])
    assert outputs.batch.masks.dtype == torch.bfloat16
    fused = fuse_modes(outputs, batch, MODES, bf16)  # casts to float32 before fusing
    assert all(len(entities) > 0 for entities in fused["batch_oc"])
    outer = torch.autocast("cpu", dtype=torch.bfloat16)  # as under trainer.precision=bf16-mixed
    with torch.no_grad(), outer, inference_precision("cpu", InferenceSettings()):  # fp32: off
        outputs = trained(batch["images"])
    assert outputs.batch.masks.dtype == torch.float32


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_backbone_and_pixel_decoder_equal_eager(backend):
    """``aot_eager`` traces and runs the same graphs as inductor but skips its C++ build
    (about 40 s cold on our 2 cores), so the fast test uses it; inductor is the slow one."""
    torch._dynamo.reset()
    net = tiny_net().eval()
    images = torch.randn(1, 3, 3, 64, 96)
    with torch.no_grad():
        eager = net(images)
        net.compile_parts(backend=backend)
        compiled = net(images)
    for actual, expected in zip(compiled.to_tuple(), eager.to_tuple(), strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert len(eager.to_tuple()) == 4  # both decoders' logits and masks


def test_compile_keeps_state_dict_keys_and_checkpoints_load(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo"])
        compiled_cfg = compose("train", overrides=["experiment=demo", "model.compile=true"])
    assert cfg.model.compile is False
    eager = instantiate(cfg.model)
    compiled = instantiate(compiled_cfg.model)
    assert compiled.hparams.compile is True
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    path = tmp_path / "eager.ckpt"  # a Lightning-style checkpoint of the eager module
    torch.save({"state_dict": eager.state_dict()}, path)
    load_weights(compiled.net, path)  # strict: the same names and shapes
    compiled.load_state_dict(eager.state_dict())


def test_a_bad_precision_is_one_clear_line(tmp_path):
    """The library raises ConfigError; the entry points turn it into one line and an exit."""
    problem = "inference.precision='fp16': is unknown; expected one of"
    message = "config error: " + problem
    with pytest.raises(ConfigError, match=problem):
        InferenceSettings(precision="fp16")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "inference.precision=fp16"])
    with pytest.raises(ConfigError, match="model." + problem):
        instantiate_checked(cfg.model, "model")
    result = run_python(  # evaluate stops before it reads data or weights
        "-m",
        "entityseg.evaluate",
        "experiment=demo",
        "ckpt_path=nope.ckpt",
        "inference.precision=fp16",
        f"hydra.run.dir={tmp_path}/run",
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_bf16_mixed_training_on_the_cpu(tmp_path, monkeypatch):
    seen = []  # (network output dtype, loss dtype) of every training step
    criterion_forward = CropFormerCriterion.forward

    def recording_forward(self, outputs, targets):
        losses = criterion_forward(self, outputs, targets)
        seen.append((outputs.batch.masks.dtype, losses["loss"].dtype))
        return losses

    monkeypatch.setattr(CropFormerCriterion, "forward", recording_forward)
    metrics, _ = train(
        train_config(
            tmp_path,
            "+trainer.fast_dev_run=2",
            "trainer.precision=bf16-mixed",
            "inference.precision=bf16",
            "test=false",
        )
    )
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/ap_batch_oc" in metrics


def test_criterion_computes_float32_losses_from_bf16_outputs(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    criterion = CropFormerCriterion(num_points=256)
    with torch.no_grad():
        outputs = tiny_net().train()(batch["images"])

    def bf16(out: DecoderOutput) -> DecoderOutput:
        return DecoderOutput(
            out.logits.bfloat16(), out.masks.bfloat16(), [bf16(a) for a in out.aux]
        )

    half = CropFormerOutput(bf16(outputs.image), bf16(outputs.batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        losses = criterion(half, batch["targets"])
    torch.manual_seed(0)
    reference = criterion(outputs, batch["targets"])
    assert all(v.dtype == torch.float32 for v in losses.values())
    torch.testing.assert_close(losses["loss"], reference["loss"], rtol=0.02, atol=0.02)
