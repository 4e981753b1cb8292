"""The network's typed outputs: CropFormerOutput / DecoderOutput, their layout and helpers."""

import dataclasses

import pytest
import torch

from conftest import tiny_model
from entityseg.inference.exported import BATCH_OUTPUTS, IMAGE_OUTPUTS
from entityseg.models.batch_decoder import broadcast_to_views
from entityseg.models.image_decoder import DecoderPrediction, image_level_output
from entityseg.models.outputs import TUPLE_NAMES, CropFormerOutput, DecoderOutput

N, V, Q, H, W = 2, 3, 8, 64, 96


@pytest.fixture(scope="module")
def outputs() -> CropFormerOutput:
    with torch.no_grad():
        return tiny_model().eval()(torch.randn(N, V, 3, H, W))


def test_forward_returns_typed_outputs_with_the_documented_shapes(outputs):
    assert isinstance(outputs, CropFormerOutput)
    for level in (outputs.image, outputs.batch):
        assert isinstance(level, DecoderOutput)
        assert level.logits.shape == (N, V, Q, 2)
        assert level.masks.shape == (N, V, Q, H // 4, W // 4)
        assert [type(a) for a in level.aux] == [DecoderOutput] * 3
    with pytest.raises(TypeError):
        outputs["image"]  # noqa: B018  strings index nothing
    with pytest.raises(dataclasses.FrozenInstanceError):
        outputs.image = outputs.batch


def test_to_tuple_order_is_the_exported_graphs(outputs):
    assert TUPLE_NAMES == IMAGE_OUTPUTS + BATCH_OUTPUTS
    tensors = outputs.to_tuple()
    expected = (
        outputs.image.logits,
        outputs.image.masks,
        outputs.batch.logits,
        outputs.batch.masks,
    )
    assert len(tensors) == len(TUPLE_NAMES)
    assert all(a is b for a, b in zip(tensors, expected, strict=True))
    image_only = CropFormerOutput(outputs.image)
    assert len(image_only.to_tuple()) == len(IMAGE_OUTPUTS)
    assert image_only.to_tuple()[1] is outputs.image.masks


def test_float_casts_the_final_predictions_only(outputs):
    def bf16(out: DecoderOutput) -> DecoderOutput:
        aux = [DecoderOutput(a.logits.bfloat16(), None) for a in out.aux]
        return DecoderOutput(out.logits.bfloat16(), out.masks.bfloat16(), aux)

    half = CropFormerOutput(bf16(outputs.image), bf16(outputs.batch))
    full = half.float()
    for ours, theirs in zip(full.to_tuple(), half.to_tuple(), strict=True):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs.float())
    assert full.batch.aux[0].logits.dtype == torch.bfloat16  # aux as it was
    assert full.image.aux[0].masks is None
    # float32 already: the same tensors, no copy; no batch level stays None
    assert all(a is b for a, b in zip(outputs.float().to_tuple(), outputs.to_tuple(), strict=True))
    assert CropFormerOutput(outputs.image).float().batch is None


def test_from_layers_makes_the_last_final_and_the_rest_aux_oldest_first():
    layers = [DecoderOutput(torch.full((1, 1, 1, 2), float(i)), None) for i in range(4)]
    out = DecoderOutput.from_layers(layers)
    assert out.logits is layers[-1].logits and out.masks is None
    assert out.aux == layers[:-1]


def test_image_level_layout_unfolds_the_views():
    logits, masks = torch.randn(N * V, Q, 2), torch.randn(N * V, Q, 4, 6)
    out = image_level_output(
        [DecoderPrediction(logits[:, :1], None), DecoderPrediction(logits, masks)], N
    )
    assert out.logits.shape == (N, V, Q, 2) and out.masks.shape == (N, V, Q, 4, 6)
    assert torch.equal(out.masks[1, 2], masks[1 * V + 2])  # image 1, view 2
    assert out.aux[0].logits.shape == (N, V, 1, 2) and out.aux[0].masks is None


def test_batch_level_broadcast_shares_the_score_and_puts_views_first():
    logits, masks = torch.randn(N, Q, 2), torch.randn(N, Q, V, 4, 6)
    out = broadcast_to_views(DecoderPrediction(logits, masks), V)
    assert out.logits.shape == (N, V, Q, 2) and out.masks.shape == (N, V, Q, 4, 6)
    for v in range(V):
        assert torch.equal(out.logits[:, v], logits)  # one score per batch query, every view
        assert torch.equal(out.masks[:, v], masks[:, :, v])
    assert broadcast_to_views(DecoderPrediction(logits, None), V).masks is None
